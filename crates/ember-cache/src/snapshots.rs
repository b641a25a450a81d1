//! Snapshot artifacts and manifests (`/ember/v1/snapshots`): checkpoints
//! travel through the cluster cache like image blobs, so a node that never
//! captured a start-up restores it from here.
//!
//! ```text
//! PUT|HEAD|GET /ember/v1/snapshots/blobs/sha256:<hex>   an artifact (tar + zstd;
//!                                                        GET takes a `Range`)
//! PUT|GET|DELETE /ember/v1/snapshots/manifests/<key>    a snapshot's manifest (JSON)
//! GET /ember/v1/snapshots                                the manifests held
//! ```
//!
//! Artifacts live in the cache's blob store ([`crate::storage`]) beside
//! image blobs, so they count in its byte budget and are evicted by the
//! same LRU (a restore reading one pins it). Their metadata marks them
//! [`Meta::snapshot`] and private to [`SNAPSHOT_ORIGIN`]: the snapshot
//! routes serve only marked blobs (they are no way around an upstream's
//! access checks), and the registry routes never serve an artifact without
//! an upstream confirming it has the same bytes.
//!
//! Manifests are small JSON files under `<cache dir>/snapshots/manifests/`,
//! opaque to the cache except for their `artifact` digest. Invariants: an
//! upload is hashed while it streams to a file in `partial/` and committed
//! only if it hashes to the digest it was PUT under; a manifest is stored
//! only while its artifact is committed, and is served only while it still
//! is (one whose artifact was evicted is removed when next read).
//! Uploads and deletes need the bearer token of
//! [`CacheConfig::snapshot_write_token`](crate::CacheConfig): restoring a
//! snapshot runs its memory image, so writes are never open; reads are,
//! like the mirror's.
//!
//! With `--peer`s, a manifest or artifact missing here is asked from the
//! other cache servers in turn ([`PeerSet`], as the directory cache
//! does), marked with [`PEER_HEADER`] so the peer answers from its own
//! store only. A peer's answer is passed through, not stored here (an
//! artifact streams from the peer as the client reads it, `Range`
//! included); the client verifies the artifact's digest as always.

use crate::cache::Cache;
use crate::error::CacheError;
use crate::flight::{self, Source};
use crate::metrics::Metrics;
use crate::peers::{PeerSet, from_peer};
use crate::storage::Meta;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ember_oci::Digest;
use futures_util::StreamExt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;

/// The pseudo-upstream snapshot artifacts are private to. It contains a
/// `/`, which no upstream name (a host alias or `host[:port]`) can.
pub const SNAPSHOT_ORIGIN: &str = "ember/snapshots";

/// Largest manifest accepted (they are a few kilobytes).
const MAX_MANIFEST: usize = 1 << 20;
/// Longest key (as `ember_store`'s snapshot names).
const KEY_MAX: usize = 128;

/// Marks a snapshot request one cache server sends another on a miss.
pub const PEER_HEADER: &str = "x-ember-snapshot-peer";

/// Response headers of a peer's artifact answer passed on to the client.
const PASSED_HEADERS: [header::HeaderName; 4] = [
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::CONTENT_TYPE,
    header::ACCEPT_RANGES,
];

/// The snapshot routes' state.
pub struct Snapshots {
    cache: Arc<Cache>,
    /// `<cache dir>/snapshots`.
    dir: PathBuf,
    /// Distinguishes temporary manifest names.
    seq: AtomicU64,
    /// The other cache servers (`--peer`), asked on a miss.
    peers: Option<PeerSet>,
}

type St = State<Arc<Snapshots>>;

/// One manifest in `GET /ember/v1/snapshots`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Listed {
    /// Its key.
    pub key: String,
    /// Its artifact.
    pub artifact: String,
    /// The artifact's size.
    pub artifact_bytes: u64,
    /// The image name the manifest gives, if any.
    #[serde(default)]
    pub image_name: Option<String>,
    /// When the manifest was stored (Unix milliseconds).
    pub stored_ms: u64,
}

/// `GET /ember/v1/snapshots`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Listing {
    /// Manifests whose artifact is held, by key.
    pub snapshots: Vec<Listed>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CacheError {
    let what = what.into();
    move |e| CacheError::io(what, e)
}

/// Checks a manifest key: it becomes a file name.
pub fn check_key(key: &str) -> Result<(), CacheError> {
    let ok = !key.is_empty()
        && key.len() <= KEY_MAX
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CacheError::BadRequest(format!(
            "invalid snapshot key {key:?}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

fn parse_digest(s: &str) -> Result<Digest, CacheError> {
    match s.parse::<Digest>() {
        Ok(d) if d.algorithm() == "sha256" => Ok(d),
        _ => Err(CacheError::DigestInvalid(s.to_string())),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::io("a worker thread", std::io::Error::other(e)))?
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        serde_json::to_string(v).unwrap_or_default(),
    )
        .into_response()
}

/// The `/ember/v1/snapshots` routes (to be merged at the root). Creates
/// `<cache dir>/snapshots` and clears what a previous process left in its
/// `tmp/`.
pub fn router<S>(cache: Arc<Cache>) -> Result<Router<S>, CacheError> {
    let dir = cache.config.dir.join("snapshots");
    for d in ["manifests", "tmp"] {
        let p = dir.join(d);
        fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
    }
    if let Ok(rd) = fs::read_dir(dir.join("tmp")) {
        for e in rd.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let peers = match cache.ring() {
        Some(ring) => PeerSet::new(ring.others(), PEER_HEADER)?,
        None => None,
    };
    let state = Arc::new(Snapshots {
        cache,
        dir,
        seq: AtomicU64::new(0),
        peers,
    });
    Ok(Router::new()
        .route("/ember/v1/snapshots", get(list))
        .route(
            "/ember/v1/snapshots/blobs/{digest}",
            get(get_blob).head(get_blob).put(put_blob),
        )
        .route(
            "/ember/v1/snapshots/manifests/{key}",
            get(get_manifest)
                .put(put_manifest)
                .delete(delete_manifest)
                .layer(DefaultBodyLimit::max(MAX_MANIFEST)),
        )
        .with_state(state))
}

/// The snapshot gauges for `/metrics` (walks the blob index once).
pub fn render_gauges(cache: &Cache) -> String {
    let (n, bytes) = cache.store.count_where(|m| m.snapshot);
    format!(
        "# HELP ember_cache_snapshot_stored_bytes Bytes of snapshot artifacts held (part of the blob budget).\n\
         # TYPE ember_cache_snapshot_stored_bytes gauge\n\
         ember_cache_snapshot_stored_bytes {bytes}\n\
         # HELP ember_cache_snapshot_stored_artifacts Snapshot artifacts held.\n\
         # TYPE ember_cache_snapshot_stored_artifacts gauge\n\
         ember_cache_snapshot_stored_artifacts {n}\n"
    )
}

impl Snapshots {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), CacheError> {
        let Some(want) = &self.cache.config.snapshot_write_token else {
            return Err(CacheError::WriteDenied(
                "snapshot uploads are off on this cache (start it with --snapshot-write-token)"
                    .into(),
            ));
        };
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match got {
            Some(t) if constant_time_eq(t.as_bytes(), want.as_bytes()) => Ok(()),
            _ => Err(CacheError::WriteDenied(
                "writing snapshots needs the cache's snapshot write token".into(),
            )),
        }
    }

    fn manifest_path(&self, key: &str) -> PathBuf {
        self.dir.join("manifests").join(format!("{key}.json"))
    }

    /// Whether `d` is a committed snapshot artifact; marks it used.
    fn has_artifact(&self, d: &Digest) -> bool {
        // `get` gives the metadata and counts as a use, which reading or
        // writing a manifest of the artifact is; the pin ends here.
        matches!(self.cache.store.get(d), Ok(Some(p)) if p.meta.snapshot)
    }

    /// Reads manifest `key`: its bytes and artifact; `None` if there is
    /// none, or if its artifact is gone (then the manifest is removed).
    /// Blocking.
    fn read_manifest(&self, key: &str) -> Result<Option<(Vec<u8>, Digest)>, CacheError> {
        let p = self.manifest_path(key);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(format!("reading {}", p.display()))(e)),
        };
        let artifact = artifact_of(&bytes).ok();
        match artifact {
            Some(d) if self.has_artifact(&d) => Ok(Some((bytes, d))),
            _ => {
                // Evicted under the byte budget (or unreadable): the
                // manifest can no longer be restored from.
                tracing::info!(key, "snapshot manifest without its artifact removed");
                let _ = fs::remove_file(&p);
                Ok(None)
            }
        }
    }

    fn write_manifest(&self, key: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let tmp = self.dir.join("tmp").join(format!(
            "{key}.{}.{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let dest = self.manifest_path(key);
        let r = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &dest)
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r.map_err(io(format!("writing {}", dest.display())))
    }

    fn list(&self) -> Result<Listing, CacheError> {
        let dir = self.dir.join("manifests");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir)
            .map_err(io(format!("reading {}", dir.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json") else {
                continue;
            };
            if check_key(key).is_err() {
                continue;
            }
            let stored_ms = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            let Some((bytes, artifact)) = self.read_manifest(key)? else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            out.push(Listed {
                key: key.to_string(),
                artifact: artifact.to_string(),
                artifact_bytes: v["artifact_bytes"].as_u64().unwrap_or(0),
                image_name: v["image_name"].as_str().map(str::to_owned),
                stored_ms,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Listing { snapshots: out })
    }
}

/// The `artifact` digest a manifest names.
fn artifact_of(bytes: &[u8]) -> Result<Digest, CacheError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| CacheError::BadRequest(format!("snapshot manifest is not JSON: {e}")))?;
    let a = v
        .get("artifact")
        .and_then(|a| a.as_str())
        .ok_or_else(|| CacheError::BadRequest("snapshot manifest names no \"artifact\"".into()))?;
    parse_digest(a)
}

async fn list(State(s): St) -> Response {
    match blocking(move || s.list()).await {
        Ok(l) => json(StatusCode::OK, &l),
        Err(e) => e.into_response(),
    }
}

/// `GET|HEAD /ember/v1/snapshots/blobs/{digest}`: the artifact, or with a
/// single-range `Range` header the bytes asked for (206), so a client
/// whose download broke off resumes where it stopped.
async fn get_blob(
    State(s): St,
    UrlPath(digest): UrlPath<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let r = async {
        let d = parse_digest(&digest)?;
        let (store, d2) = (s.cache.store.clone(), d.clone());
        let pinned = blocking(move || store.get(&d2)).await?;
        match pinned {
            Some(p) if p.meta.snapshot => Ok((d, p)),
            _ => {
                Metrics::add(&s.cache.metrics.snapshot_misses, 1);
                Err(CacheError::BlobUnknown(format!("snapshot artifact {d}")))
            }
        }
    }
    .await;
    let (d, pinned) = match r {
        Ok(x) => x,
        Err(e @ CacheError::BlobUnknown(_)) => {
            if !from_peer(&headers, PEER_HEADER)
                && let Some(resp) = s.artifact_from_peers(&digest, &method, &headers).await
            {
                return resp;
            }
            return e.into_response();
        }
        Err(e) => return e.into_response(),
    };
    let size = pinned.size;
    let range = match headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::route::parse_range)
        .map(|spec| spec.resolve(size))
        .transpose()
    {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", d.to_string());
    let (start, end) = match range {
        Some(r) => {
            b = b
                .status(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/{size}", r.start, r.end - 1),
                )
                .header(header::CONTENT_LENGTH, r.end - r.start);
            (r.start, r.end)
        }
        None => {
            b = b
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, size);
            (0, size)
        }
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Metrics::add(&s.cache.metrics.snapshot_blob_hits, 1);
        let metrics = s.cache.metrics.clone();
        // Read from the pinned file in chunks as the client takes them:
        // memory stays bounded whatever the artifact's size.
        Body::from_stream(
            flight::body(
                Source::Stored(pinned),
                start,
                Some(end),
                s.cache.metrics.clone(),
            )
            .inspect(move |c| {
                if let Ok(b) = c {
                    Metrics::add(&metrics.snapshot_served_bytes, b.len() as u64);
                }
            }),
        )
    };
    b.body(body).unwrap_or_else(|_| Response::default())
}

async fn put_blob(
    State(s): St,
    UrlPath(digest): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = upload(&s, &digest, &headers, body).await;
    match r {
        Ok((d, size)) => {
            Metrics::add(&s.cache.metrics.snapshot_uploads, 1);
            Metrics::add(&s.cache.metrics.snapshot_uploaded_bytes, size);
            json(
                StatusCode::CREATED,
                &serde_json::json!({"digest": d.to_string(), "bytes": size}),
            )
        }
        Err(e) => {
            Metrics::add(&s.cache.metrics.snapshot_refused, 1);
            e.into_response()
        }
    }
}

/// Streams an upload into `partial/` while hashing it, and commits it if
/// it hashes to `digest`.
async fn upload(
    s: &Snapshots,
    digest: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Digest, u64), CacheError> {
    let store = s.cache.store.clone();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |d: &Digest, n: u64| {
        CacheError::TooLarge(format!(
            "snapshot artifact {d} of at least {n} bytes is over the cache's byte budget"
        ))
    };
    // Refusals decided before the body is read.
    let checked = async {
        s.authorize(headers)?;
        let d = parse_digest(digest)?;
        if let Some(n) = declared {
            if !store.keeps(n) {
                return Err(too_large(&d, n));
            }
            let st = store.clone();
            if !blocking(move || Ok(st.make_room(n))).await? {
                return Err(CacheError::NoRoom {
                    what: format!("snapshot artifact {d}"),
                    bytes: n,
                });
            }
        }
        Ok(d)
    }
    .await;
    let d = match checked {
        Ok(d) => d,
        Err(e) => {
            crate::error::discard_body(body).await;
            return Err(e);
        }
    };
    let partial = store.upload_path(&d);
    let result = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(io(format!("creating {}", partial.display())))?;
        let mut verifier = d.verifier();
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| CacheError::BadRequest(format!("upload of {d} broke off: {e}")))?;
            verifier.update(&chunk);
            if !store.keeps(verifier.len()) {
                return Err(too_large(&d, verifier.len()));
            }
            file.write_all(&chunk)
                .await
                .map_err(io(format!("writing {}", partial.display())))?;
        }
        let size = verifier.len();
        if let Some(n) = declared
            && n != size
        {
            return Err(CacheError::BadRequest(format!(
                "upload of {d}: {size} bytes arrived, Content-Length said {n}"
            )));
        }
        verifier
            .finish()
            .map_err(|actual| CacheError::UploadDigestMismatch {
                expected: d.to_string(),
                actual: actual.to_string(),
            })?;
        file.sync_all()
            .await
            .map_err(io(format!("syncing {}", partial.display())))?;
        Ok::<_, CacheError>(size)
    }
    .await;
    let size = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    let (d2, p2) = (d.clone(), partial.clone());
    let committed = blocking(move || {
        if store.mark_snapshot(&d2)? {
            // The same bytes are already held: keep that copy.
            let _ = fs::remove_file(&p2);
            return Ok(());
        }
        let meta = Meta {
            snapshot: true,
            private_to: vec![SNAPSHOT_ORIGIN.to_string()],
            ..Default::default()
        };
        store.commit(&d2, &p2, size, meta)
    })
    .await;
    if committed.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    committed?;
    tracing::info!(digest = %d, size, "snapshot artifact stored");
    Ok((d, size))
}

impl Snapshots {
    /// Artifact `digest` from the first peer that has it (`GET` or `HEAD`,
    /// the client's `Range` passed on), streamed through as it arrives.
    async fn artifact_from_peers(
        &self,
        digest: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<Response> {
        let p = self.peers.as_ref()?;
        let m = if method == Method::HEAD {
            reqwest::Method::HEAD
        } else {
            reqwest::Method::GET
        };
        let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
        for url in p.urls() {
            let u = format!("{url}/ember/v1/snapshots/blobs/{digest}");
            let Some(resp) = p
                .ask(url, |h| {
                    let r = h.request(m.clone(), &u);
                    match range {
                        Some(v) => r.header(reqwest::header::RANGE, v),
                        None => r,
                    }
                })
                .await
            else {
                continue;
            };
            Metrics::add(&self.cache.metrics.snapshot_peer_hits, 1);
            let mut b = Response::builder()
                .status(resp.status().as_u16())
                .header("docker-content-digest", digest);
            for h in &PASSED_HEADERS {
                if let Some(v) = resp.headers().get(h.as_str()).and_then(|v| v.to_str().ok()) {
                    b = b.header(h, v);
                }
            }
            let body = if method == Method::HEAD {
                Body::empty()
            } else {
                let metrics = self.cache.metrics.clone();
                Body::from_stream(resp.bytes_stream().inspect(move |c| {
                    if let Ok(b) = c {
                        Metrics::add(&metrics.snapshot_served_bytes, b.len() as u64);
                    }
                }))
            };
            return Some(b.body(body).unwrap_or_else(|_| Response::default()));
        }
        None
    }

    /// Manifest `key` from the first peer that has one naming an artifact.
    async fn manifest_from_peers(&self, key: &str) -> Option<Vec<u8>> {
        let p = self.peers.as_ref()?;
        for url in p.urls() {
            let u = format!("{url}/ember/v1/snapshots/manifests/{key}");
            let Some(resp) = p.ask(url, |h| h.get(&u)).await else {
                continue;
            };
            match resp.bytes().await {
                Ok(b) if b.len() <= MAX_MANIFEST && artifact_of(&b).is_ok() => {
                    Metrics::add(&self.cache.metrics.snapshot_peer_hits, 1);
                    return Some(b.to_vec());
                }
                Ok(_) => {
                    tracing::warn!(peer = %url, key, "peer sent an unreadable snapshot manifest")
                }
                Err(e) => {
                    tracing::warn!(peer = %url, key, error = %ember_error::chain(&e), "peer broke off a snapshot manifest")
                }
            }
        }
        None
    }
}

async fn get_manifest(State(s): St, UrlPath(key): UrlPath<String>, headers: HeaderMap) -> Response {
    let r = async {
        check_key(&key)?;
        let (s2, k) = (s.clone(), key.clone());
        blocking(move || s2.read_manifest(&k)).await
    }
    .await;
    match r {
        Ok(Some((bytes, _))) => {
            Metrics::add(&s.cache.metrics.snapshot_manifest_hits, 1);
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                bytes,
            )
                .into_response()
        }
        Ok(None) => {
            // Not held here, whether or not a peer has it.
            Metrics::add(&s.cache.metrics.snapshot_misses, 1);
            if !from_peer(&headers, PEER_HEADER)
                && let Some(bytes) = s.manifest_from_peers(&key).await
            {
                return (
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    bytes,
                )
                    .into_response();
            }
            CacheError::SnapshotUnknown(key).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn put_manifest(
    State(s): St,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = async {
        s.authorize(&headers)?;
        check_key(&key)?;
        let artifact = artifact_of(&body)?;
        let (s2, k) = (s.clone(), key.clone());
        blocking(move || {
            if !s2.has_artifact(&artifact) {
                return Err(CacheError::BlobUnknown(format!(
                    "snapshot artifact {artifact} is not in the cache; upload it before its manifest"
                )));
            }
            s2.write_manifest(&k, &body)
        })
        .await
    }
    .await;
    match r {
        Ok(()) => json(StatusCode::CREATED, &serde_json::json!({"key": key})),
        Err(e) => e.into_response(),
    }
}

async fn delete_manifest(
    State(s): St,
    UrlPath(key): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let r = async {
        s.authorize(&headers)?;
        check_key(&key)?;
        let p = s.manifest_path(&key);
        match tokio::fs::remove_file(&p).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(CacheError::SnapshotUnknown(key.clone()))
            }
            Err(e) => Err(io(format!("removing {}", p.display()))(e)),
        }
    }
    .await;
    // The artifact stays until the LRU takes it: another manifest may
    // name the same bytes.
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Where the cache keeps snapshot manifests (for tests and tools).
pub fn manifests_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("snapshots/manifests")
}
