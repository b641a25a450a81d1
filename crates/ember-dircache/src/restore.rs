//! Restoring an entry: look it up, check its manifest, fetch and verify
//! its chunks (in order, several in flight), write the tree into a fresh
//! directory beside the target (files by several threads: the `writer`
//! module), then put it in place with one rename (an atomic exchange when
//! the target exists). On any failure the fresh directory is removed and
//! the target is as it was.

use crate::chunk;
use crate::client::CacheClient;
use crate::error::DircacheError;
use crate::manifest::{Manifest, Policy, check_name};
use crate::progress::Progress;
use crate::save::join_err;
use crate::wire::{EntryInfo, LookupRequest};
use crate::writer::{Chunk, ChunkSource, Decoded, write_tree};
use futures_util::StreamExt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Scopes to search in order (the run's branch, then the default
    /// branch); all are only read.
    pub scopes: Vec<String>,
    /// The key.
    pub key: String,
    /// Prefix fallbacks, tried in order after the key itself.
    pub restore_keys: Vec<String>,
    /// Chunk downloads in flight at once.
    pub concurrency: usize,
    /// Symlink targets policy.
    pub policy: Policy,
    /// Restore owners (uid/gid); default: when running as root.
    pub same_owner: bool,
    /// Counters for a progress display.
    pub progress: Arc<Progress>,
}

impl RestoreOptions {
    /// Defaults: 8 downloads in flight, owners restored when root.
    pub fn new(scopes: Vec<String>, key: &str) -> Self {
        RestoreOptions {
            scopes,
            key: key.to_string(),
            restore_keys: Vec::new(),
            concurrency: 8,
            policy: Policy::default(),
            same_owner: nix::unistd::geteuid().is_root(),
            progress: Arc::default(),
        }
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The entry restored.
    pub entry: EntryInfo,
    /// Whether its key is exactly the one asked for.
    pub exact: bool,
    /// Nodes written.
    pub nodes: u64,
    /// File data bytes written.
    pub bytes: u64,
    /// Chunks fetched.
    pub chunks: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Looks up and restores an entry into `target`; `Ok(None)` on a miss
/// (the target untouched).
pub async fn restore(
    client: &CacheClient,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<Option<RestoreReport>, DircacheError> {
    let t0 = Instant::now();
    for s in &opts.scopes {
        check_name("scope", s)?;
    }
    check_name("key", &opts.key)?;
    for k in &opts.restore_keys {
        check_name("restore key", k)?;
    }
    let found = client
        .lookup(&LookupRequest {
            scopes: opts.scopes.clone(),
            key: opts.key.clone(),
            restore_keys: opts.restore_keys.clone(),
        })
        .await?;
    let Some(found) = found else {
        return Ok(None);
    };
    tracing::debug!(elapsed = ?t0.elapsed(), nodes = found.manifest.nodes.len(), "restore: entry found");
    let mut report = restore_manifest(client, &found.manifest, target, opts).await?;
    report.entry = found.info;
    report.exact = found.exact;
    report.elapsed = t0.elapsed();
    Ok(Some(report))
}

/// Removes the staging directory unless the restore got to the end.
struct Staging(Option<PathBuf>);
impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(&p);
        }
    }
}

/// Restores `manifest` into `target` (see the module docs). The manifest is
/// validated first: nothing is written for one that fails. The report's
/// `entry` carries only the manifest's sizes ([`restore`] fills in the rest).
pub async fn restore_manifest(
    client: &CacheClient,
    manifest: &Manifest,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport, DircacheError> {
    let t0 = Instant::now();
    manifest.validate(opts.policy)?;
    tracing::debug!(elapsed = ?t0.elapsed(), "restore: manifest validated");
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .ok_or_else(|| DircacheError::Unsupported {
            path: target.to_path_buf(),
            detail: "the target has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    fs::create_dir_all(&parent)
        .map_err(|e| DircacheError::io(format!("creating {}", parent.display()), e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    // Beside the target, so the final rename stays on one filesystem; a
    // dot name marked as incomplete, so nothing mistakes it for the tree.
    let staging = parent.join(format!(
        ".{name}.ember-incomplete.{}.{nanos}",
        std::process::id()
    ));
    fs::create_dir(&staging)
        .map_err(|e| DircacheError::io(format!("creating {}", staging.display()), e))?;
    let mut guard = Staging(Some(staging.clone()));
    opts.progress
        .total_bytes
        .store(manifest.data_bytes(), Ordering::Relaxed);

    tracing::debug!(elapsed = ?t0.elapsed(), "restore: staging ready");
    let (fetched, written) = run_pipeline(client, manifest, &staging, opts).await?;
    let (nodes, bytes) = written;
    tracing::debug!(elapsed = ?t0.elapsed(), "restore: tree written");

    swap_into_place(&staging, target)?;
    guard.0 = None;
    Ok(RestoreReport {
        entry: EntryInfo {
            scope: String::new(),
            key: String::new(),
            bytes: 0,
            data_bytes: manifest.data_bytes(),
            chunks: manifest.unique_digests().len() as u64,
            created_ms: 0,
            last_used_ms: 0,
        },
        exact: false,
        nodes,
        bytes,
        chunks: fetched,
        elapsed: t0.elapsed(),
    })
}

/// Chunks asked for in one `chunks/fetch` request.
const BATCH_CHUNKS: usize = 32;
/// Uncompressed bytes asked for in one request, at most (a batch of
/// incompressible chunks stays a few MiB).
const BATCH_BYTES: u64 = 4 << 20;

/// Threads decompressing and verifying: both cores of a small machine (the
/// file writer and the network share them), at most 4.
fn decoders() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .clamp(1, 4)
}

/// Fetches, verifies and writes: batches of chunks fetched in order with
/// `concurrency` requests in flight; chunk `i` goes to decoder `i % D`,
/// which decompresses (one reused zstd context) and checks its digest into
/// a recycled buffer; the tree walk takes chunk `i` from decoder `i % D`
/// (so the stream stays in order without a reorder buffer) and hands
/// files to `D` writer threads (the `writer` module), the buffer going back
/// once its files are written. Decompressing, hashing and creating files
/// thus all run on every core. Returns (chunks fetched, (nodes, bytes)
/// written).
async fn run_pipeline(
    client: &CacheClient,
    manifest: &Manifest,
    staging: &Path,
    opts: &RestoreOptions,
) -> Result<(u64, (u64, u64)), DircacheError> {
    let m = Arc::new(manifest.clone());
    let d = decoders();
    let mut to_dec = Vec::with_capacity(d);
    let mut from_dec = Vec::with_capacity(d);
    let mut decoders = Vec::with_capacity(d);
    for _ in 0..d {
        let (in_tx, mut in_rx) =
            tokio::sync::mpsc::channel::<(usize, bytes::Bytes)>(BATCH_CHUNKS * 2);
        let (out_tx, out_rx) = std::sync::mpsc::sync_channel::<Decoded>(16);
        // Buffers come home here when the files using them are written.
        let (home, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        to_dec.push(in_tx);
        from_dec.push(out_rx);
        let m = m.clone();
        decoders.push(
            std::thread::Builder::new()
                .name("dircache-decode".into())
                .spawn(move || {
                    let mut dctx = match zstd::bulk::Decompressor::new() {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = out_tx.send(Err(DircacheError::io("starting zstd", e)));
                            return;
                        }
                    };
                    while let Some((i, stored)) = in_rx.blocking_recv() {
                        let c = &m.chunks[i];
                        let mut buf = spare.try_recv().unwrap_or_default();
                        let r = chunk::open_into(&mut dctx, &c.digest, &stored, c.size, &mut buf)
                            .map(|()| Chunk::new(buf, home.clone()));
                        let failed = r.is_err();
                        if out_tx.send(r).is_err() || failed {
                            break;
                        }
                    }
                })
                .map_err(|e| DircacheError::io("starting a decoder thread", e))?,
        );
    }
    let dir = staging.to_path_buf();
    let same_owner = opts.same_owner;
    let wprogress = opts.progress.clone();
    let wm = m.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut src = ChunkSource::new(from_dec);
        write_tree(&wm, &dir, &mut src, same_owner, &wprogress, d)
    });

    // Batches of consecutive chunks.
    let mut batches: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0usize;
    let mut bytes = 0u64;
    for (i, c) in manifest.chunks.iter().enumerate() {
        if i > start && (i - start == BATCH_CHUNKS || bytes + u64::from(c.size) > BATCH_BYTES) {
            batches.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += u64::from(c.size);
    }
    if start < manifest.chunks.len() {
        batches.push(start..manifest.chunks.len());
    }
    let mut fetched = 0u64;
    let mut fetch_err = None;
    {
        let mut stream = futures_util::stream::iter(batches.into_iter().map(|r| {
            let digests: Vec<&str> = manifest.chunks[r.clone()]
                .iter()
                .map(|c| c.digest.as_str())
                .collect();
            async move { client.fetch_stored(&digests).await.map(|v| (r.start, v)) }
        }))
        .buffered(opts.concurrency.max(1));
        'fetch: while let Some(b) = stream.next().await {
            match b {
                Ok((first, stored)) => {
                    for (k, data) in stored.into_iter().enumerate() {
                        let i = first + k;
                        // Bounded: waits (without blocking the runtime)
                        // while the decoders and the disk catch up.
                        if to_dec[i % d].send((i, data)).await.is_err() {
                            break 'fetch; // the pipeline failed; its error is reported
                        }
                        fetched += 1;
                        opts.progress
                            .chunks_uploaded
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    fetch_err = Some(e);
                    break;
                }
            }
        }
    }
    drop(to_dec);
    let written = writer.await.map_err(join_err)?;
    for t in decoders {
        let _ = t.join();
    }
    if let Some(e) = fetch_err {
        return Err(e);
    }
    Ok((fetched, written?))
}

/// Puts the finished `staging` tree at `target`: an atomic exchange if
/// the target exists (then the old tree is removed), else a rename.
fn swap_into_place(staging: &Path, target: &Path) -> Result<(), DircacheError> {
    let io = |e| {
        DircacheError::io(
            format!("moving the restored tree to {}", target.display()),
            e,
        )
    };
    match fs::symlink_metadata(target) {
        Ok(md) if md.is_dir() => {
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                staging,
                nix::fcntl::AT_FDCWD,
                target,
                nix::fcntl::RenameFlags::RENAME_EXCHANGE,
            )
            .map_err(|e| io(std::io::Error::from(e)))?;
            // `staging` now holds the old tree.
            let _ = fs::remove_dir_all(staging);
            Ok(())
        }
        Ok(_) => Err(DircacheError::Unsupported {
            path: target.to_path_buf(),
            detail: "exists and is not a directory".into(),
        }),
        Err(_) => fs::rename(staging, target).map_err(io),
    }
}
