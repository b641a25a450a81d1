//! Snapshots through the cluster cache (`ember cache`'s
//! `/ember/v1/snapshots`): [`SnapshotCache::push`] sends a store's
//! snapshot there, [`SnapshotCache::fetch`] brings one into a store on a
//! node that never captured it.
//!
//! A fetch reads the manifest first and checks the checkpoint's metadata
//! against this machine ([`check_compatible`]: CRIU version, kernel,
//! machine, CPU features) before a byte of the artifact is downloaded: a
//! checkpoint that cannot be restored here is not worth its transfer, and
//! the caller gets the reason as [`SnapshotCacheError::Incompatible`]. The
//! artifact then streams into the store through
//! [`Store::import_snapshot`], which hashes it on the way and renames it
//! into place only if it matches, so a truncated or tampered download
//! leaves the store without the snapshot (and without a partial file).
//! A download that breaks off mid-body is resumed with a `Range` request
//! from the first byte not yet received, into the same hashing import, so
//! the digest checked at the end is the whole artifact's
//! ([`RESUME_STALLS`] attempts in a row that bring nothing end it).
//!
//! Both the node and `ember snapshot push|pull` use this module.

use bytes::Bytes;
use ember_oci::Digest;
use ember_runtime::Metadata;
use ember_runtime::checkpoint::{CheckpointError, HostFacts, ImageIdentity, METADATA_FILE};
use ember_store::{SnapshotError, SnapshotManifest, Store};
use std::io::{self, Read};
use std::path::Path;
use std::time::Duration;

/// Bytes per chunk of an upload read from the artifact file.
const UPLOAD_CHUNK: usize = 256 << 10;
/// Chunks of a download buffered between the network and the store.
const DOWNLOAD_QUEUE: usize = 16;
/// Resumes in a row that bring no byte before a broken-off download is
/// given up on.
pub const RESUME_STALLS: u32 = 3;
/// Most resumes of one download, however much each brings.
const MAX_RESUMES: u32 = 64;

/// Errors of snapshot transfers.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotCacheError {
    /// The cache could not be reached or broke off.
    #[error("snapshot cache {url}: {detail}")]
    Transport {
        /// The request's URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The cache answered with an error.
    #[error("snapshot cache refused {what} ({status}): {message}")]
    Refused {
        /// What was asked.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The cache's message.
        message: String,
    },
    /// The cache has no snapshot of that name.
    #[error("the snapshot cache has no snapshot named {0:?}")]
    NotFound(String),
    /// The checkpoint cannot be restored on this machine; nothing was
    /// downloaded.
    #[error(
        "snapshot {name} cannot be restored here: its {what} is {recorded:?} but {here:?} here; not downloaded"
    )]
    Incompatible {
        /// The snapshot.
        name: String,
        /// What differs ("kernel release", "CPU features", …).
        what: String,
        /// The checkpoint's value.
        recorded: String,
        /// This machine's.
        here: String,
    },
    /// The manifest the cache served is not a snapshot manifest.
    #[error("snapshot {name}: the cache served an unreadable manifest: {detail}")]
    BadManifest {
        /// The snapshot.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// The store refused or failed (a digest mismatch lands here).
    #[error(transparent)]
    Store(#[from] SnapshotError),
    /// This machine's facts could not be read (CRIU missing).
    #[error(transparent)]
    Host(Box<CheckpointError>),
}

impl From<CheckpointError> for SnapshotCacheError {
    fn from(e: CheckpointError) -> Self {
        SnapshotCacheError::Host(Box::new(e))
    }
}

/// What [`SnapshotCache::push`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    /// The snapshot's artifact.
    pub artifact: Digest,
    /// Its size.
    pub bytes: u64,
    /// Whether it was uploaded (false: the cache had it).
    pub uploaded: bool,
}

/// What [`SnapshotCache::fetch`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetched {
    /// The manifest now in the store.
    pub manifest: SnapshotManifest,
    /// Whether the artifact was downloaded (false: the store had it).
    pub downloaded: bool,
    /// Bytes downloaded.
    pub bytes: u64,
}

/// A client of one cache's snapshot routes.
#[derive(Clone)]
pub struct SnapshotCache {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

fn transport(url: &str, e: &reqwest::Error) -> SnapshotCacheError {
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        src = s.source();
    }
    SnapshotCacheError::Transport {
        url: url.to_string(),
        detail,
    }
}

async fn refused(what: &str, resp: reqwest::Response) -> SnapshotCacheError {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    // The cache's errors are OCI error bodies; show their message.
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
        .unwrap_or(body);
    SnapshotCacheError::Refused {
        what: what.to_string(),
        status,
        message,
    }
}

/// Checks `manifest`'s checkpoint metadata against this machine's facts:
/// what a restore here would refuse, said before anything is downloaded.
/// The image is checked against the manifest's own (the node pulls the
/// image by itself; a restore checks it again against what is mounted).
pub fn check_compatible(
    manifest: &SnapshotManifest,
    here: &HostFacts,
) -> Result<(), SnapshotCacheError> {
    let bad = |detail: String| SnapshotCacheError::BadManifest {
        name: manifest.name.clone(),
        detail,
    };
    let meta: Metadata = serde_json::from_value(manifest.metadata.clone())
        .map_err(|e| bad(format!("checkpoint metadata: {e}")))?;
    if meta.format != ember_runtime::checkpoint::METADATA_FORMAT {
        return Err(SnapshotCacheError::Incompatible {
            name: manifest.name.clone(),
            what: "checkpoint metadata format".into(),
            recorded: meta.format.to_string(),
            here: ember_runtime::checkpoint::METADATA_FORMAT.to_string(),
        });
    }
    let image = ImageIdentity {
        digest: manifest.image.to_string(),
        layers: manifest.layers.iter().map(ToString::to_string).collect(),
    };
    match meta.check(Path::new(METADATA_FILE), here, &image) {
        Ok(()) => Ok(()),
        Err(CheckpointError::Mismatch {
            what,
            recorded,
            here,
            ..
        }) => Err(SnapshotCacheError::Incompatible {
            name: manifest.name.clone(),
            what: what.to_string(),
            recorded,
            here,
        }),
        Err(e) => Err(e.into()),
    }
}

/// A `Read` over chunks sent from the async side, for the store's
/// blocking import.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    buf: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = self.buf.len().min(out.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

impl SnapshotCache {
    /// A client of the cache at `url` (`http://host:port`). `token` is
    /// sent as a bearer token: the cache needs it to store snapshots.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, SnapshotCacheError> {
        let http = ember_http::client::builder(&[url])
            .connect_timeout(Duration::from_secs(10))
            // No overall timeout: an artifact may be gigabytes. A cache
            // that stops sending for this long is given up on.
            .read_timeout(Duration::from_secs(120))
            .user_agent(concat!("ember-snapshots/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| transport(url, &e))?;
        Ok(SnapshotCache {
            base: url.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> (String, reqwest::RequestBuilder) {
        let url = format!("{}/ember/v1/snapshots/{path}", self.base);
        let mut r = self.http.request(method, &url);
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        (url, r)
    }

    async fn send(
        &self,
        what: &str,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SnapshotCacheError> {
        let resp = req.send().await.map_err(|e| transport(url, &e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(refused(what, resp).await)
        }
    }

    /// Whether the cache holds artifact `d`.
    pub async fn has_artifact(&self, d: &Digest) -> Result<bool, SnapshotCacheError> {
        let (url, r) = self.req(reqwest::Method::HEAD, &format!("blobs/{d}"));
        let resp = r.send().await.map_err(|e| transport(&url, &e))?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(refused(&format!("a HEAD of artifact {d}"), resp).await),
        }
    }

    /// Sends snapshot `name` of `store` to the cache under the key `name`:
    /// its artifact (unless the cache has it), then its manifest.
    pub async fn push(&self, store: &Store, name: &str) -> Result<Pushed, SnapshotCacheError> {
        let m = store.snapshot(name)?;
        let d = m.artifact.clone();
        let path = store.artifact_path(&d);
        let uploaded = if self.has_artifact(&d).await? {
            false
        } else {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|source| SnapshotError::Io {
                    op: "open",
                    path: path.clone(),
                    source,
                })?;
            let len = file
                .metadata()
                .await
                .map_err(|source| SnapshotError::Io {
                    op: "read",
                    path: path.clone(),
                    source,
                })?
                .len();
            // Read as the connection takes it: memory stays bounded.
            let stream = futures_util::stream::unfold(file, |mut f| async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; UPLOAD_CHUNK];
                match f.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok::<_, io::Error>(Bytes::from(buf)), f))
                    }
                    Err(e) => Some((Err(e), f)),
                }
            });
            let (url, r) = self.req(reqwest::Method::PUT, &format!("blobs/{d}"));
            let r = r
                .header(reqwest::header::CONTENT_LENGTH, len)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(reqwest::Body::wrap_stream(stream));
            self.send(&format!("the upload of artifact {d}"), &url, r)
                .await?;
            true
        };
        let body = serde_json::to_vec(&m).map_err(|e| SnapshotCacheError::BadManifest {
            name: name.to_string(),
            detail: e.to_string(),
        })?;
        let (url, r) = self.req(reqwest::Method::PUT, &format!("manifests/{name}"));
        let r = r
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.send(&format!("the manifest of {name}"), &url, r)
            .await?;
        Ok(Pushed {
            artifact: d,
            bytes: m.artifact_bytes,
            uploaded,
        })
    }

    /// The manifest stored under `key`.
    pub async fn manifest(&self, key: &str) -> Result<SnapshotManifest, SnapshotCacheError> {
        ember_store::snapshot::validate_name(key)?;
        let (url, r) = self.req(reqwest::Method::GET, &format!("manifests/{key}"));
        let resp = r.send().await.map_err(|e| transport(&url, &e))?;
        if resp.status().as_u16() == 404 {
            return Err(SnapshotCacheError::NotFound(key.to_string()));
        }
        if !resp.status().is_success() {
            return Err(refused(&format!("the manifest of {key}"), resp).await);
        }
        let body = resp.bytes().await.map_err(|e| transport(&url, &e))?;
        serde_json::from_slice(&body).map_err(|e| SnapshotCacheError::BadManifest {
            name: key.to_string(),
            detail: e.to_string(),
        })
    }

    /// Brings snapshot `name` from the cache into `store`, if it can be
    /// restored on a machine with facts `here` (checked before the
    /// download). The artifact is verified as it streams in; on any error
    /// the store is left without the snapshot.
    pub async fn fetch(
        &self,
        store: &Store,
        name: &str,
        here: &HostFacts,
    ) -> Result<Fetched, SnapshotCacheError> {
        let mut m = self.manifest(name).await?;
        // Stored under the name it was asked by.
        m.name = name.to_string();
        check_compatible(&m, here)?;
        let d = m.artifact.clone();
        if store.artifact_path(&d).is_file() {
            // The same bytes by digest (another snapshot of them, or an
            // earlier fetch); a restore verifies them before use.
            store.put_snapshot(&m)?;
            return Ok(Fetched {
                manifest: m,
                downloaded: false,
                bytes: 0,
            });
        }
        let (url, r) = self.req(reqwest::Method::GET, &format!("blobs/{d}"));
        let resp = self
            .send(&format!("artifact {d} of {name}"), &url, r)
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(DOWNLOAD_QUEUE);
        let (store2, m2) = (store.clone(), m.clone());
        let import = tokio::task::spawn_blocking(move || {
            store2.import_snapshot(
                &m2,
                ChannelReader {
                    rx,
                    buf: Bytes::new(),
                },
            )
        });
        let mut broke = None;
        // Bytes sent to the import so far, and bytes of the current
        // response to drop first (a cache that ignored the `Range`).
        let (mut received, mut skip) = (0u64, 0u64);
        let (mut resumes, mut stalls, mut at_last_break) = (0u32, 0u32, 0u64);
        let mut resp = Some(resp);
        'download: loop {
            let err = match resp.take() {
                Some(mut r) => loop {
                    match r.chunk().await {
                        Ok(Some(mut b)) => {
                            if skip > 0 {
                                let n = skip.min(b.len() as u64);
                                skip -= n;
                                b = b.slice(n as usize..);
                                if b.is_empty() {
                                    continue;
                                }
                            }
                            received += b.len() as u64;
                            if tx.send(Ok(b)).await.is_err() {
                                break 'download; // the import gave up; its error says why
                            }
                        }
                        Ok(None) => break 'download,
                        Err(e) => break transport(&url, &e),
                    }
                },
                None => broke
                    .take()
                    .unwrap_or_else(|| SnapshotCacheError::Transport {
                        url: url.clone(),
                        detail: "no response".into(),
                    }),
            };
            if received > at_last_break {
                stalls = 0;
            } else {
                stalls += 1;
            }
            at_last_break = received;
            if stalls >= RESUME_STALLS || resumes >= MAX_RESUMES || received >= m.artifact_bytes {
                let _ = tx
                    .send(Err(io::Error::other(format!("download broke off: {err}"))))
                    .await;
                broke = Some(err);
                break;
            }
            resumes += 1;
            tracing::info!(artifact = %d, received, of = m.artifact_bytes, error = %err, "artifact download broke off; resuming");
            if stalls > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(stalls))).await;
            }
            let (_, r) = self.req(reqwest::Method::GET, &format!("blobs/{d}"));
            let r = r.header(reqwest::header::RANGE, format!("bytes={received}-"));
            match r.send().await {
                Ok(r) if r.status() == reqwest::StatusCode::PARTIAL_CONTENT => {
                    let from = r
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split_once('-'))
                        .and_then(|(a, _)| a.parse::<u64>().ok());
                    if from == Some(received) {
                        skip = 0;
                        resp = Some(r);
                    } else {
                        broke = Some(SnapshotCacheError::Transport {
                            url: url.clone(),
                            detail: format!(
                                "asked to resume at byte {received}, the cache answered the range {from:?}"
                            ),
                        });
                    }
                }
                Ok(r) if r.status().is_success() => {
                    // The whole artifact again: drop what was received.
                    skip = received;
                    resp = Some(r);
                }
                Ok(r) => {
                    let err = refused(&format!("the resume of artifact {d} of {name}"), r).await;
                    let _ = tx
                        .send(Err(io::Error::other(format!("download broke off: {err}"))))
                        .await;
                    broke = Some(err);
                    break;
                }
                Err(e) => broke = Some(transport(&url, &e)),
            }
        }
        drop(tx);
        let imported = import.await.map_err(|e| SnapshotError::Io {
            op: "import",
            path: store.artifact_path(&d),
            source: io::Error::other(e),
        })?;
        match (imported, broke) {
            (Ok(bytes), _) => Ok(Fetched {
                manifest: m,
                downloaded: true,
                bytes,
            }),
            // The transfer's own error says more than the store's "read
            // failed".
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
        }
    }
}
