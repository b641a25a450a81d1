//! Counters a progress display reads while a save or restore runs.

use std::sync::atomic::AtomicU64;

/// Updated lock-free by save and restore; read by whoever shows progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// File data bytes to process (known once the tree is scanned or the
    /// manifest fetched).
    pub total_bytes: AtomicU64,
    /// File data bytes chunked (save) or written (restore).
    pub bytes_done: AtomicU64,
    /// Chunks uploaded (save) or downloaded (restore).
    pub chunks_uploaded: AtomicU64,
    /// Chunks the cache already had (save).
    pub chunks_reused: AtomicU64,
    /// Compressed bytes sent (save) or received (restore).
    pub bytes_uploaded: AtomicU64,
}
