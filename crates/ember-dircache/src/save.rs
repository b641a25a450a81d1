//! Saving a directory: scan, chunk the data stream, ask the cache which
//! chunks it lacks, upload only those (in parallel), then store the
//! manifest. Chunking runs on a blocking thread while uploads of earlier
//! chunks proceed, so the tree is read once and never archived on disk.

use crate::chunk::{self, AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
use crate::client::{CacheClient, Stored};
use crate::error::DircacheError;
use crate::manifest::{ChunkRef, MANIFEST_VERSION, Manifest, Policy, check_name};
use crate::progress::Progress;
use crate::walk::{DataStream, scan};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Chunks asked about (and then uploaded) together.
const BATCH: usize = 64;

/// What to save and where.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// The scope to save into (a branch).
    pub scope: String,
    /// The entry's key.
    pub key: String,
    /// A read-only client (an untrusted run) refuses to save.
    pub read_only: bool,
    /// Chunk uploads in flight at once.
    pub concurrency: usize,
    /// Counters for a progress display.
    pub progress: Arc<Progress>,
}

impl SaveOptions {
    /// Defaults: 8 uploads in flight, writable.
    pub fn new(scope: &str, key: &str) -> Self {
        SaveOptions {
            scope: scope.to_string(),
            key: key.to_string(),
            read_only: false,
            concurrency: 8,
            progress: Arc::default(),
        }
    }
}

/// What a save did.
#[derive(Debug, Clone, Default)]
pub struct SaveReport {
    /// Whether a new entry was stored (false: the key already had one, or
    /// an identical save raced this one).
    pub created: bool,
    /// Regular files (hardlinks not counted).
    pub files: u64,
    /// All nodes (directories, files, links).
    pub nodes: u64,
    /// Bytes of file data chunked.
    pub bytes_chunked: u64,
    /// Chunks in the data stream.
    pub chunks: u64,
    /// Distinct chunks.
    pub unique_chunks: u64,
    /// Distinct chunks uploaded (the cache lacked them).
    pub chunks_uploaded: u64,
    /// Distinct chunks the cache already had.
    pub chunks_reused: u64,
    /// Compressed bytes uploaded.
    pub bytes_uploaded: u64,
    /// Uncompressed bytes of the uploaded chunks.
    pub data_bytes_uploaded: u64,
    /// Sockets, FIFOs and devices left out.
    pub skipped: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Saves the tree at `dir` as entry `opts.key` in `opts.scope`. If the key
/// already has an entry the tree is not read at all (entries are
/// immutable) and the report says `created: false`.
pub async fn save(
    client: &CacheClient,
    dir: &Path,
    opts: &SaveOptions,
) -> Result<SaveReport, DircacheError> {
    let t0 = Instant::now();
    if opts.read_only {
        return Err(DircacheError::ReadOnly(opts.scope.clone()));
    }
    check_name("scope", &opts.scope)?;
    check_name("key", &opts.key)?;
    let mut report = SaveReport::default();
    if client.exists(&opts.scope, &opts.key).await? {
        report.elapsed = t0.elapsed();
        return Ok(report);
    }
    let root = dir.to_path_buf();
    let scanned = tokio::task::spawn_blocking(move || scan(&root))
        .await
        .map_err(join_err)??;
    report.nodes = scanned.nodes.len() as u64;
    report.files = scanned.files.len() as u64;
    report.skipped = scanned.skipped.len() as u64;
    for p in &scanned.skipped {
        tracing::warn!(path = %p.display(), "not a file, directory or symlink: left out");
    }
    let total: u64 = scanned.files.iter().map(|(_, s)| s).sum();
    let progress = opts.progress.clone();
    progress.total_bytes.store(total, Ordering::Relaxed);

    // Chunking thread -> (ref, compressed) -> this task.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(ChunkRef, Bytes)>(2 * BATCH);
    let stream = DataStream::new(scanned.files);
    let failure = stream.failure.clone();
    let chunker_progress = progress.clone();
    let chunker = tokio::task::spawn_blocking(move || -> Result<(), DircacheError> {
        let cdc = fastcdc::v2020::StreamCDC::new(stream, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
        for c in cdc {
            let c = c.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(e) => DircacheError::io("reading the tree", e),
                e => DircacheError::io("chunking", std::io::Error::other(e.to_string())),
            })?;
            let digest = chunk::digest_hex(&c.data);
            let stored = chunk::compress(&c.data)?;
            chunker_progress
                .bytes_done
                .fetch_add(c.data.len() as u64, Ordering::Relaxed);
            let r = ChunkRef {
                digest,
                size: c.data.len() as u32,
            };
            if tx.blocking_send((r, Bytes::from(stored))).is_err() {
                // The uploader stopped (it failed): its error is reported.
                return Ok(());
            }
        }
        Ok(())
    });

    let mut chunks = Vec::new();
    let mut seen = HashSet::new();
    let mut batch: Vec<(ChunkRef, Bytes)> = Vec::new();
    let mut upload_result = Ok(());
    while let Some((r, stored)) = rx.recv().await {
        chunks.push(r.clone());
        if seen.insert(r.digest.clone()) {
            batch.push((r, stored));
        }
        if batch.len() >= BATCH {
            upload_result = flush(client, &mut batch, opts, &mut report).await;
            if upload_result.is_err() {
                break;
            }
        }
    }
    if upload_result.is_ok() {
        upload_result = flush(client, &mut batch, opts, &mut report).await;
    }
    drop(rx);
    let chunked = chunker.await.map_err(join_err)?;
    // A read failure inside the stream is the real cause of a chunker error.
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    chunked?;
    upload_result?;

    report.chunks = chunks.len() as u64;
    report.unique_chunks = seen.len() as u64;
    report.bytes_chunked = chunks.iter().map(|c| u64::from(c.size)).sum();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        nodes: scanned.nodes,
        chunks,
    };
    // What the cache will check, checked here first: a tree we cannot
    // restore (a symlink out of it) is better refused at save time.
    manifest.validate(Policy {
        allow_absolute_symlinks: true,
    })?;
    report.created = client.put_entry(&opts.scope, &opts.key, &manifest).await? == Stored::Created;
    report.elapsed = t0.elapsed();
    Ok(report)
}

async fn flush(
    client: &CacheClient,
    batch: &mut Vec<(ChunkRef, Bytes)>,
    opts: &SaveOptions,
    report: &mut SaveReport,
) -> Result<(), DircacheError> {
    if batch.is_empty() {
        return Ok(());
    }
    let digests: Vec<String> = batch.iter().map(|(r, _)| r.digest.clone()).collect();
    let missing: HashSet<String> = client.missing(&digests).await?.into_iter().collect();
    let todo: Vec<(ChunkRef, Bytes)> = batch
        .drain(..)
        .filter(|(r, _)| {
            let m = missing.contains(&r.digest);
            if !m {
                report.chunks_reused += 1;
                opts.progress.chunks_reused.fetch_add(1, Ordering::Relaxed);
            }
            m
        })
        .collect();
    let mut uploads = futures_util::stream::iter(todo.into_iter().map(|(r, stored)| async move {
        let n = stored.len() as u64;
        client.put_chunk(&r.digest, stored).await.map(|()| (r, n))
    }))
    .buffer_unordered(opts.concurrency.max(1));
    while let Some(done) = uploads.next().await {
        let (r, n) = done?;
        report.chunks_uploaded += 1;
        report.bytes_uploaded += n;
        report.data_bytes_uploaded += u64::from(r.size);
        opts.progress
            .chunks_uploaded
            .fetch_add(1, Ordering::Relaxed);
        opts.progress.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
    }
    Ok(())
}

pub(crate) fn join_err(e: tokio::task::JoinError) -> DircacheError {
    DircacheError::io("a worker thread", std::io::Error::other(e))
}
