//! The pull pipeline: resolve a reference to a platform manifest, then for
//! every missing layer stream download → digest check → decompress →
//! diff_id check → tar extraction as one pipeline, layers in parallel.
//!
//! The network task and the extraction thread are joined by a bounded
//! channel, so neither waits for a whole blob: extraction starts with the
//! first chunk, and a slow disk slows the download instead of buffering it
//! in memory. A layer is renamed into `layers/` only after both its
//! compressed digest and its diff_id check out.

use crate::error::{StoreError, io, registry};
use crate::index::{ImageRecord, LayerRecord, LayerRef};
use crate::unpack::{self, Mode, UnpackError, UnpackStats};
use crate::{Store, now_ms, remove_any};
use bytes::Bytes;
use ember_oci::manifest::{ConfigDoc, IndexDoc, ManifestDoc};
use ember_oci::media::{self, Compression, ManifestKind};
use ember_oci::{Digest, Platform, Reference, Verifier};
use ember_registry::{RegistryClient, RegistryError};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most concurrent layer downloads per pull (Docker and containerd use 3).
const PARALLEL_LAYERS: usize = 4;
/// Configs are small JSON documents.
const MAX_CONFIG_BYTES: usize = 8 << 20;

/// Pull settings.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Platform to pick from an index.
    pub platform: Platform,
    /// Attempts per layer when a download fails in a retryable way.
    pub layer_attempts: u32,
    /// `syncfs` the store before committing layers. When false (the
    /// default), layers are committed at once and marked with the current
    /// boot id instead; a store opened after a reboot discards such layers,
    /// since a power loss may have dropped their data. A `kill -9` needs
    /// neither: the page cache outlives the process. The sync costs about
    /// as much as the download of a large image on this kind of disk.
    pub durable: bool,
    /// Record each layer's tree for `ember store verify` (the default).
    /// Off only to measure what recording costs a pull: `verify` then
    /// reports those layers as having no record.
    pub record_trees: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::host(),
            layer_attempts: 3,
            durable: false,
            record_trees: true,
        }
    }
}

/// Receives progress of a pull (the CLI draws bars or prints lines).
pub trait PullProgress: Send + Sync {
    /// The image resolved to `manifest` with `layers` layers.
    fn resolved(&self, _manifest: &Digest, _layers: usize) {}
    /// A layer starts downloading; `size` from the manifest.
    fn layer_started(&self, _digest: &Digest, _size: u64) {}
    /// `n` more bytes of a layer arrived.
    fn layer_bytes(&self, _digest: &Digest, _n: u64) {}
    /// A layer is unpacked and verified, or was already present.
    fn layer_done(&self, _digest: &Digest, _already_present: bool) {}
    /// A layer attempt failed and will be retried.
    fn layer_retry(&self, _digest: &Digest, _error: &str) {}
}

/// Progress that goes nowhere.
pub struct SilentProgress;
impl PullProgress for SilentProgress {}

/// Paces a pull: awaited by every layer download after each chunk it
/// receives, so a low-priority pull (a node's pre-pull) can be held to a
/// bandwidth or paused outright while a run's pull goes first. While a
/// gate holds a download, its connection stays open and nothing more is
/// read from it.
pub trait PullGate: Send + Sync {
    /// `bytes` more arrived; returns when the download may read on.
    fn admit(
        &self,
        bytes: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

/// Where a pull's time went. Download and unpack overlap: `fetch` runs from
/// the first layer request until the last byte arrived; `unpack` is the
/// extraction that was still going after that; `commit` the sync and
/// index update.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PullTimings {
    /// Manifest(s) and config.
    pub resolve: Duration,
    /// Layer downloads (overlapping extraction).
    pub fetch: Duration,
    /// Extraction remaining after the last byte arrived.
    pub unpack: Duration,
    /// syncfs, renames and index update.
    pub commit: Duration,
    /// Whole pull.
    pub total: Duration,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The image as recorded in the store.
    pub image: ImageRecord,
    /// Where the time went.
    pub timings: PullTimings,
    /// Compressed bytes downloaded.
    pub bytes_downloaded: u64,
    /// Layers that were already in the store.
    pub layers_present: usize,
    /// Layers downloaded.
    pub layers_fetched: usize,
}

/// Pulls `reference` into `store`.
pub async fn pull(
    store: &Store,
    client: &Arc<RegistryClient>,
    reference: &Reference,
    opts: &PullOptions,
    progress: Arc<dyn PullProgress>,
) -> Result<PullReport, StoreError> {
    pull_gated(store, client, reference, opts, progress, None).await
}

/// [`pull`], with every layer download paced by `gate` (see [`PullGate`]).
pub async fn pull_gated(
    store: &Store,
    client: &Arc<RegistryClient>,
    reference: &Reference,
    opts: &PullOptions,
    progress: Arc<dyn PullProgress>,
    gate: Option<Arc<dyn PullGate>>,
) -> Result<PullReport, StoreError> {
    let t0 = Instant::now();
    let refname = reference.to_string();
    let bad = |detail: String| StoreError::BadImage {
        reference: refname.clone(),
        detail,
    };

    // Resolve: tag or digest → manifest, through an index if need be.
    let top = client
        .manifest(reference, &reference.manifest_reference())
        .await
        .map_err(registry(reference))?;
    let (manifest, index_digest, index_bytes) = match media::manifest_kind(&top.media_type) {
        Some(ManifestKind::Manifest) => (top, None, None),
        Some(ManifestKind::Index) => {
            let doc: IndexDoc = serde_json::from_slice(&top.bytes)
                .map_err(|e| bad(format!("index {}: {e}", top.digest)))?;
            let chosen = doc
                .manifests
                .iter()
                .find(|m| {
                    m.platform.as_ref().is_some_and(|p| {
                        opts.platform
                            .matches(&p.os, &p.architecture, p.variant.as_deref())
                    }) && media::manifest_kind(&m.media_type) == Some(ManifestKind::Manifest)
                })
                .ok_or_else(|| StoreError::NoPlatform {
                    reference: refname.clone(),
                    platform: opts.platform.to_string(),
                    available: doc
                        .manifests
                        .iter()
                        .filter_map(|m| m.platform.as_ref())
                        .map(|p| match &p.variant {
                            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                            None => format!("{}/{}", p.os, p.architecture),
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let m = client
                .manifest(reference, &chosen.digest.to_string())
                .await
                .map_err(registry(reference))?;
            if media::manifest_kind(&m.media_type) != Some(ManifestKind::Manifest) {
                return Err(bad(format!("{} is not an image manifest", chosen.digest)));
            }
            (m, Some(top.digest.clone()), Some(top.bytes.clone()))
        }
        None => return Err(bad(format!("unsupported manifest type {}", top.media_type))),
    };
    let doc: ManifestDoc = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| bad(format!("manifest {}: {e}", manifest.digest)))?;
    let config_bytes = client
        .blob_bytes(reference, &doc.config.digest, MAX_CONFIG_BYTES)
        .await
        .map_err(registry(reference))?;
    let config: ConfigDoc = serde_json::from_slice(&config_bytes)
        .map_err(|e| bad(format!("config {}: {e}", doc.config.digest)))?;
    if config.rootfs.diff_ids.len() != doc.layers.len() {
        return Err(bad(format!(
            "manifest has {} layers but config lists {} diff_ids",
            doc.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (l, diff_id) in doc.layers.iter().zip(&config.rootfs.diff_ids) {
        if media::layer_compression(&l.media_type).is_none() {
            return Err(bad(format!(
                "layer {} has unsupported media type {}",
                l.digest, l.media_type
            )));
        }
        layers.push(LayerRef {
            digest: l.digest.clone(),
            diff_id: diff_id.clone(),
            size: l.size,
            media_type: l.media_type.clone(),
        });
    }
    progress.resolved(&manifest.digest, layers.len());
    let resolve = t0.elapsed();

    // Fetch and unpack the missing layers, several at a time.
    let t_fetch = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(PARALLEL_LAYERS));
    let mut tasks = tokio::task::JoinSet::new();
    let mut present = 0;
    let mut seen = std::collections::HashSet::new();
    // A layer counts as present only if the index vouches for it: a
    // directory the index does not know is an orphan of a crash between
    // rename and index write, whose data may never have reached the disk.
    let known = store.read_index()?.layers;
    // Set when one layer fails: the others stop feeding their extraction
    // and clean up after themselves (aborting them would skip that).
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for l in &layers {
        if !seen.insert(l.diff_id.clone()) {
            continue; // the same layer twice in one image
        }
        if known.contains_key(&l.diff_id) && store.layer_dir(&l.diff_id).is_dir() {
            present += 1;
            progress.layer_done(&l.digest, true);
            continue;
        }
        let (store, client, r, l, sem, progress, opts, cancel, gate) = (
            store.clone(),
            client.clone(),
            reference.clone(),
            l.clone(),
            sem.clone(),
            progress.clone(),
            opts.clone(),
            cancel.clone(),
            gate.clone(),
        );
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::BadImage {
                    reference: r.to_string(),
                    detail: "cancelled".into(),
                });
            }
            let gate = gate.as_deref();
            fetch_layer(
                &store,
                &client,
                &r,
                &l,
                &opts,
                progress.as_ref(),
                &cancel,
                gate,
            )
            .await
        });
    }
    let mut fetched = Vec::new();
    let mut first_err = None;
    let mut last_byte = Duration::ZERO;
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(done)) => {
                last_byte = last_byte.max(done.last_byte_at.duration_since(t_fetch));
                fetched.push(done);
            }
            Ok(Err(e)) => {
                if first_err.is_none() {
                    first_err = Some(e);
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(join) if join.is_cancelled() => {}
            Err(join) => {
                first_err.get_or_insert(StoreError::BadImage {
                    reference: refname.clone(),
                    detail: format!("layer task failed: {join}"),
                });
            }
        }
    }
    if let Some(e) = first_err {
        // `fetched` layers' temp dirs go with their guards.
        return Err(e);
    }
    let fetch_all = t_fetch.elapsed();

    // Commit: make the data durable, then rename layers into place and
    // record the image under the lock (so GC cannot interleave).
    let t_commit = Instant::now();
    let now = now_ms();
    let record = ImageRecord {
        manifest: manifest.digest.clone(),
        media_type: manifest.media_type.clone(),
        index: index_digest.clone(),
        repository: reference.name(),
        platform: opts.platform.to_string(),
        config: doc.config.digest.clone(),
        layers: layers.clone(),
        pulled_at: now / 1000,
        last_used_ms: now,
    };
    let bytes_downloaded = fetched.iter().map(|f| f.compressed).sum();
    let layers_fetched = fetched.len();
    let mut blobs: Vec<(&Digest, &[u8])> = Vec::new();
    if let (Some(d), Some(b)) = (&index_digest, &index_bytes) {
        blobs.push((d, b));
    }
    blobs.push((&manifest.digest, &manifest.bytes));
    blobs.push((&doc.config.digest, &config_bytes));
    commit_image(
        store,
        &refname,
        fetched,
        &blobs,
        &record,
        std::slice::from_ref(&refname),
        opts.durable,
    )?;
    let commit = t_commit.elapsed();
    Ok(PullReport {
        image: record,
        timings: PullTimings {
            resolve,
            fetch: last_byte.min(fetch_all),
            unpack: fetch_all.saturating_sub(last_byte),
            commit,
            total: t0.elapsed(),
        },
        bytes_downloaded,
        layers_present: present,
        layers_fetched,
    })
}

/// Commits verified layers (still in their temp dirs), the image's small
/// blobs and its index record, naming it `refs`: the one commit path of
/// pulls and imports. Layers are made durable first when `durable` (else
/// marked with the boot id), renamed into `layers/` under the index lock
/// (so GC cannot interleave), and the index is written last, so a failure
/// anywhere before leaves the store as it was (temp dirs go with their
/// guards). `label` names the image in errors.
pub(crate) fn commit_image(
    store: &Store,
    label: &str,
    fetched: Vec<FetchedLayer>,
    blobs: &[(&Digest, &[u8])],
    record: &ImageRecord,
    refs: &[String],
    durable: bool,
) -> Result<(), StoreError> {
    let bad = |detail: String| StoreError::BadImage {
        reference: label.to_string(),
        detail,
    };
    // Each layer's tree record, written before the sync (which covers it,
    // so no fsync per record) and renamed into `trees/` just before its
    // layer goes into `layers/`.
    let records = fetched
        .iter()
        .map(|f| stage_record(store, &f.stats))
        .collect::<Result<Vec<_>, _>>()?;
    if durable && !fetched.is_empty() {
        let root = std::fs::File::open(store.root()).map_err(io("open", store.root()))?;
        // SAFETY: syncfs on a descriptor we own.
        if unsafe { libc::syncfs(root.as_raw_fd()) } != 0 {
            return Err(io("syncfs", store.root())(std::io::Error::last_os_error()));
        }
    }
    for (d, b) in blobs {
        store.put_blob(d, b)?;
    }
    let lock = store.lock()?;
    let mut ix = store.read_index()?;
    for (f, record) in fetched.into_iter().zip(records) {
        let dest = store.layer_dir(&f.diff_id);
        // Record first: a crash between the renames leaves a record
        // without a layer (harmless), never a layer without a record.
        let put_record = || -> Result<(), StoreError> {
            if let Some(r) = &record {
                let p = store.tree_path(&f.diff_id);
                std::fs::rename(r.path(), &p).map_err(io("rename", &p))?;
                r.keep();
            }
            Ok(())
        };
        if dest.exists() {
            if ix.layers.contains_key(&f.diff_id) {
                // Another pull committed the same layer first; theirs
                // is just as verified as ours (ours goes with its guard).
            } else {
                // An orphan nobody vouches for: replace it with ours.
                let old = store.tmp_path("orphan");
                std::fs::rename(&dest, &old).map_err(io("rename", &dest))?;
                let _ = remove_any(&old);
                put_record()?;
                std::fs::rename(f.tmp.path(), &dest).map_err(io("rename", &dest))?;
                f.tmp.keep();
            }
        } else {
            put_record()?;
            std::fs::rename(f.tmp.path(), &dest).map_err(io("rename", &dest))?;
            f.tmp.keep();
        }
        ix.layers.insert(
            f.diff_id.clone(),
            LayerRecord {
                bytes: f.stats.bytes,
                entries: f.stats.entries,
                unsynced_boot: (!durable).then(crate::boot_id).flatten(),
            },
        );
    }
    for l in &record.layers {
        if !store.layer_dir(&l.diff_id).is_dir() || !ix.layers.contains_key(&l.diff_id) {
            return Err(bad(format!(
                "layer {} was removed by a concurrent gc; try again",
                l.diff_id
            )));
        }
    }
    ix.images.insert(record.manifest.clone(), record.clone());
    for r in refs {
        ix.refs.insert(r.clone(), record.manifest.clone());
    }
    store.write_index(&lock, &ix)?;
    Ok(())
}

/// Writes a fetched layer's tree record to a temporary file, to be renamed
/// into `trees/` at commit (a durable pull's `syncfs` covers it).
fn stage_record(store: &Store, stats: &UnpackStats) -> Result<Option<TmpGuard>, StoreError> {
    let Some(tree) = &stats.tree else {
        return Ok(None);
    };
    let dir = store.root().join("trees");
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let guard = TmpGuard {
        path: store.tmp_path("tree"),
        keep: std::sync::atomic::AtomicBool::new(false),
    };
    let mut f = std::fs::File::create(guard.path()).map_err(io("create", guard.path()))?;
    std::io::Write::write_all(&mut f, &tree.to_bytes()).map_err(io("write", guard.path()))?;
    Ok(Some(guard))
}

/// A temporary directory removed when dropped unless kept: a layer task
/// that fails, or a pull future that is dropped (timeout, Ctrl-C), does
/// not leave partial layers behind in a long-running process.
pub(crate) struct TmpGuard {
    path: std::path::PathBuf,
    keep: std::sync::atomic::AtomicBool,
}

impl TmpGuard {
    /// A guard for `path` (not created here), removed on drop.
    pub(crate) fn new(path: std::path::PathBuf) -> TmpGuard {
        TmpGuard {
            path,
            keep: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn keep(&self) {
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if !self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = remove_any(&self.path);
        }
    }
}

/// A verified layer in its temp dir, waiting for [`commit_image`].
pub(crate) struct FetchedLayer {
    pub(crate) diff_id: Digest,
    pub(crate) tmp: TmpGuard,
    pub(crate) stats: UnpackStats,
    pub(crate) compressed: u64,
    pub(crate) last_byte_at: Instant,
}

/// One layer with retries: each attempt starts over in a fresh temp dir.
#[allow(clippy::too_many_arguments)]
async fn fetch_layer(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    layer: &LayerRef,
    opts: &PullOptions,
    progress: &dyn PullProgress,
    cancel: &std::sync::atomic::AtomicBool,
    gate: Option<&dyn PullGate>,
) -> Result<FetchedLayer, StoreError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        progress.layer_started(&layer.digest, layer.size);
        match fetch_layer_once(
            store, client, reference, layer, opts, progress, cancel, gate,
        )
        .await
        {
            Ok(f) => {
                progress.layer_done(&layer.digest, false);
                return Ok(f);
            }
            Err((e, retryable))
                if retryable
                    && attempt < opts.layer_attempts.max(1)
                    && !cancel.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                tracing::warn!(layer = %layer.digest, error = %ember_error::chain(&e), attempt, "layer download failed; retrying");
                progress.layer_retry(&layer.digest, &ember_error::chain(&e).to_string());
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

enum Fed {
    Chunk(Bytes),
    Failed(String),
}

#[allow(clippy::too_many_arguments)]
async fn fetch_layer_once(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    layer: &LayerRef,
    opts: &PullOptions,
    progress: &dyn PullProgress,
    cancel: &std::sync::atomic::AtomicBool,
    gate: Option<&dyn PullGate>,
) -> Result<FetchedLayer, (StoreError, bool)> {
    let refname = reference.to_string();
    let mut stream = client.blob(reference, &layer.digest).await.map_err(|e| {
        let r = e.is_retryable();
        (registry(reference)(e), r)
    })?;
    if let Some(n) = stream.content_length()
        && n != layer.size
    {
        return Err((
            StoreError::SizeMismatch {
                reference: refname,
                digest: layer.digest.clone(),
                expected: layer.size,
                actual: n,
            },
            false,
        ));
    }
    let tmp = TmpGuard {
        path: store.tmp_path("layer"),
        keep: std::sync::atomic::AtomicBool::new(false),
    };
    std::fs::create_dir(tmp.path()).map_err(|e| (io("create", tmp.path())(e), false))?;
    let compression = media::layer_compression(&layer.media_type).unwrap_or(Compression::None);
    let (tx, rx) = tokio::sync::mpsc::channel::<Fed>(32);
    let worker = {
        let (dir, digest, diff_id) = (
            tmp.path().to_path_buf(),
            layer.digest.clone(),
            layer.diff_id.clone(),
        );
        let record = opts.record_trees;
        tokio::task::spawn_blocking(move || {
            let src = ChannelReader {
                rx,
                cur: Bytes::new(),
                done: false,
            };
            extract(src, compression, digest, diff_id, &dir, record)
        })
    };
    // Feed the extraction thread; stop early if it has stopped reading.
    let mut net_err: Option<RegistryError> = None;
    let mut received = 0u64;
    loop {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = tx.send(Fed::Failed("cancelled".into())).await;
            break;
        }
        match stream.next_chunk().await {
            Ok(Some(c)) => {
                received += c.len() as u64;
                progress.layer_bytes(&layer.digest, c.len() as u64);
                if received > layer.size {
                    // More than the descriptor says: stop reading now rather
                    // than let a hostile server fill the disk.
                    let _ = tx
                        .send(Fed::Failed("blob longer than its descriptor".into()))
                        .await;
                    break;
                }
                let n = c.len() as u64;
                if tx.send(Fed::Chunk(c)).await.is_err() {
                    break;
                }
                if let Some(g) = gate {
                    g.admit(n).await;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let failed = Fed::Failed(ember_error::chain(&e).to_string());
                let _ = tx.send(failed).await;
                net_err = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let last_byte_at = Instant::now();
    let outcome = worker.await;
    // On every error below, `tmp` is removed by its guard.
    let cleanup = |e: StoreError, retryable: bool| (e, retryable);
    if let Some(e) = net_err {
        let r = e.is_retryable();
        return Err(cleanup(registry(reference)(e), r));
    }
    if received > layer.size {
        return Err(cleanup(
            StoreError::SizeMismatch {
                reference: refname,
                digest: layer.digest.clone(),
                expected: layer.size,
                actual: received,
            },
            false,
        ));
    }
    let ex = match outcome {
        Ok(r) => r,
        Err(join) => {
            return Err(cleanup(
                StoreError::BadImage {
                    reference: refname,
                    detail: format!("extraction of {} failed: {join}", layer.digest),
                },
                false,
            ));
        }
    };
    // The compressed digest is the first thing to check: if it is wrong,
    // any tar or inflate error is just a symptom of the wrong bytes.
    match ex.compressed {
        Err(actual) => {
            return Err(cleanup(
                StoreError::DigestMismatch {
                    reference: refname,
                    digest: layer.digest.clone(),
                    actual,
                },
                false,
            ));
        }
        Ok(_) if ex.compressed_len != layer.size => {
            return Err(cleanup(
                StoreError::SizeMismatch {
                    reference: refname,
                    digest: layer.digest.clone(),
                    expected: layer.size,
                    actual: ex.compressed_len,
                },
                false,
            ));
        }
        Ok(_) => {}
    }
    let stats = match ex.unpack {
        Ok(s) => s,
        Err(e) => {
            return Err(cleanup(
                StoreError::Unpack {
                    reference: refname,
                    digest: layer.digest.clone(),
                    source: e,
                },
                false,
            ));
        }
    };
    // Only a diff_id computed over every decompressed byte vouches for the
    // layer: layers are shared by diff_id, so accepting an unverified one
    // would let one image's layer stand in for another image's.
    match ex.diff_id {
        DiffCheck::Match => {}
        DiffCheck::Mismatch(actual) => {
            return Err(cleanup(
                StoreError::DiffIdMismatch {
                    reference: refname,
                    digest: layer.digest.clone(),
                    diff_id: layer.diff_id.clone(),
                    actual,
                },
                false,
            ));
        }
        DiffCheck::Incomplete(detail) => {
            return Err(cleanup(
                StoreError::Decompress {
                    reference: refname,
                    digest: layer.digest.clone(),
                    compression: compression.name(),
                    detail,
                },
                false,
            ));
        }
    }
    Ok(FetchedLayer {
        diff_id: layer.diff_id.clone(),
        tmp,
        stats,
        compressed: ex.compressed_len,
        last_byte_at,
    })
}

/// Says what a decoder error after the tar's end means: the decoders'
/// own messages ("invalid gzip header", "Unknown frame descriptor") do
/// not say that the tar had already ended.
fn describe_decode_error(compression: Compression, e: &std::io::Error) -> String {
    match compression {
        Compression::None => format!("reading after the tar's end: {e}"),
        Compression::Gzip | Compression::Zstd => format!(
            "after the tar's end: {e} (bytes after the last {unit}, a bad trailer or a cut stream)",
            unit = if compression == Compression::Gzip {
                "gzip member"
            } else {
                "zstd frame"
            },
        ),
    }
}

/// Reads chunks from the network task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Fed>,
    cur: Bytes,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Fed::Chunk(c)) => self.cur = c,
                Some(Fed::Failed(msg)) => {
                    self.done = true;
                    return Err(std::io::Error::other(format!("download failed: {msg}")));
                }
                None => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        let chunk = self.cur.split_to(n);
        buf[..n].copy_from_slice(&chunk);
        Ok(n)
    }
}

/// Hashes the decompressed stream (the diff_id).
struct HashingReader<R> {
    inner: R,
    verifier: Verifier,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.verifier.update(&buf[..n]);
        Ok(n)
    }
}

/// The outcome of the diff_id check.
pub(crate) enum DiffCheck {
    /// Every decompressed byte was hashed and the digest is the config's.
    Match,
    /// Every byte was hashed and the digest is this one instead.
    Mismatch(Digest),
    /// The stream could not be decompressed to its end (a decoder error,
    /// bytes after the last gzip member or zstd frame, a short stream), so
    /// no diff_id was computed. Never a pass.
    Incomplete(String),
}

/// What [`extract`] found: each check's outcome, for the caller to turn
/// into its own error (the compressed digest first: if it is wrong, any
/// later error is only a symptom).
pub(crate) struct Extracted {
    pub(crate) compressed: Result<Digest, Digest>,
    pub(crate) compressed_len: u64,
    pub(crate) diff_id: DiffCheck,
    pub(crate) unpack: Result<UnpackStats, UnpackError>,
}

/// Decompresses and unpacks the layer blob `src` into `dest`, hashing
/// the blob (against `digest`) and the decompressed stream (against
/// `diff_id`) on the way: the one extraction path of pulls and imports.
pub(crate) fn extract(
    src: impl Read,
    compression: Compression,
    digest: Digest,
    diff_id: Digest,
    dest: &std::path::Path,
    record: bool,
) -> Extracted {
    let mut cr = HashingReader {
        inner: src,
        verifier: Verifier::new(digest),
    };
    let (unpack, diff) = {
        let decoder: std::io::Result<Box<dyn Read + '_>> = match compression {
            Compression::None => Ok(Box::new(&mut cr)),
            Compression::Gzip => Ok(Box::new(flate2::read::MultiGzDecoder::new(
                std::io::BufReader::with_capacity(256 * 1024, &mut cr),
            ))),
            Compression::Zstd => {
                zstd::stream::read::Decoder::new(&mut cr).map(|d| Box::new(d) as Box<dyn Read + '_>)
            }
        };
        match decoder {
            // Still drained below, so the blob's real digest is reported.
            Err(e) => {
                let detail = e.to_string();
                (Err(UnpackError::Read(e)), DiffCheck::Incomplete(detail))
            }
            Ok(decoder) => {
                let mut hr = HashingReader {
                    inner: decoder,
                    verifier: Verifier::new(diff_id),
                };
                let unpack = if record {
                    unpack::unpack(&mut hr, dest, Mode::Overlay)
                } else {
                    unpack::unpack_unrecorded(&mut hr, dest)
                };
                let diff = match &unpack {
                    // The tar ends before the stream does (end-of-archive
                    // blocks, padding, a gzip trailer not read yet): read
                    // to the end so the diff_id covers every byte and the
                    // decoder checks its trailer and what follows it.
                    Ok(_) => match std::io::copy(&mut hr, &mut std::io::sink()) {
                        Ok(_) => match hr.verifier.finish() {
                            Ok(_) => DiffCheck::Match,
                            Err(actual) => DiffCheck::Mismatch(actual),
                        },
                        Err(e) => DiffCheck::Incomplete(describe_decode_error(compression, &e)),
                    },
                    // The unpack error is what gets reported; decompressing
                    // the rest would only spend CPU on a stream we refuse.
                    Err(e) => DiffCheck::Incomplete(ember_error::chain(e).to_string()),
                };
                (unpack, diff)
            }
        }
    };
    // Whatever happened above, hash the rest of the compressed stream so a
    // corrupt download is reported as a digest mismatch, not a tar error.
    let _ = std::io::copy(&mut cr, &mut std::io::sink());
    let compressed_len = cr.verifier.len();
    Extracted {
        compressed: cr.verifier.finish(),
        compressed_len,
        diff_id: diff,
        unpack,
    }
}
