//! The cache's disk: verified blobs by digest, an in-memory LRU index of
//! them rebuilt from disk at start, and eviction under a byte budget.
//!
//! Layout under the cache directory:
//!
//! ```text
//! blobs/<alg>/<hex>      verified blobs and manifests, by digest
//! meta/<alg>-<hex>.json  media type of a manifest, upstreams of private content
//! partial/<alg>-<hex>    downloads in progress (or broken off, kept to resume)
//! tags/<hash>.json       tag → digest resolutions with the time they were checked
//! trash/                 evicted blobs between rename and unlink
//! lock                   flock held by the one process using the directory
//! ```
//!
//! Invariants: only verified content is ever under `blobs/` (a download is
//! renamed there after its digest matched); the index's byte total is the
//! sum of the sizes of what is under `blobs/`; an entry with readers (pins)
//! is never evicted, and an evicted file is renamed away under the index
//! lock so a new download of the same digest cannot be deleted by mistake.

use crate::error::CacheError;
use crate::metrics::Metrics;
use ember_oci::Digest;
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Room kept free on the cache's filesystem beyond a download's size, for
/// metadata, tag records and other downloads' next writes.
const ROOM_MARGIN: u64 = 1 << 20;

/// How often a hit rewrites a blob's mtime, which is how recency survives a
/// restart. More often would cost a metadata write per request.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// What is known about a blob besides its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// For manifests: the media type to answer with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Empty when the blob came from a public upstream (anyone may get
    /// it); otherwise the private upstreams it is known to be on, whose
    /// clients alone may get it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private_to: Vec<String>,
    /// A snapshot artifact uploaded through `/ember/v1/snapshots`: only
    /// those routes serve it (see [`crate::snapshots`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

impl Meta {
    /// Whether a client of `upstream` may be served this content without
    /// asking the upstream whether it has it.
    pub fn visible_to(&self, upstream: &str) -> bool {
        self.private_to.is_empty() || self.private_to.iter().any(|u| u == upstream)
    }
}

struct Entry {
    size: u64,
    /// Logical clock of the last use; larger is more recent.
    last_use: u64,
    /// Responses reading it now.
    pins: u32,
    meta: Meta,
    /// When the file's mtime was last set to record a use.
    touched: Instant,
}

#[derive(Default)]
struct Index {
    entries: HashMap<Digest, Entry>,
    total: u64,
    clock: u64,
}

/// The blob store. Shared by all requests; cheap operations take a short
/// lock on the index, file I/O happens outside it (callers run the
/// blocking methods in `spawn_blocking`).
pub struct Store {
    root: PathBuf,
    /// Eviction starts when the total passes this...
    high: u64,
    /// ...and stops when it is at or below this.
    low: u64,
    index: Mutex<Index>,
    metrics: Arc<Metrics>,
    /// Distinguishes trash file names.
    trash_seq: std::sync::atomic::AtomicU64,
    /// Held (with its flock) for the store's life: two processes sharing a
    /// directory would delete each other's partial files.
    _lock: File,
}

/// A blob pinned for reading: it cannot be evicted until this is dropped.
pub struct Pinned {
    store: Arc<Store>,
    digest: Digest,
    /// The open file.
    pub file: Arc<File>,
    /// Its size.
    pub size: u64,
    /// Its metadata.
    pub meta: Meta,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut idx = self.store.lock();
        if let Some(e) = idx.entries.get_mut(&self.digest) {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pinned({}, {} bytes)", self.digest, self.size)
    }
}

fn key(d: &Digest) -> String {
    format!("{}-{}", d.algorithm(), d.hex())
}

impl Store {
    /// Opens (creating) the store at `root`, with eviction between the
    /// `high` and `low` byte watermarks. Removes partial downloads and
    /// trash a previous process left, and rebuilds the index from the
    /// blobs on disk, most recently modified = most recently used.
    pub fn open(
        root: &Path,
        high: u64,
        low: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Store>, CacheError> {
        for d in [
            "blobs/sha256",
            "blobs/sha512",
            "meta",
            "partial",
            "tags",
            "trash",
        ] {
            let p = root.join(d);
            fs::create_dir_all(&p)
                .map_err(|e| CacheError::io(format!("creating {}", p.display()), e))?;
        }
        let lock_path = root.join("lock");
        let lock = File::create(&lock_path)
            .map_err(|e| CacheError::io(format!("creating {}", lock_path.display()), e))?;
        lock.try_lock().map_err(|e| {
            CacheError::io(
                format!("{} is in use by another process", root.display()),
                std::io::Error::other(e.to_string()),
            )
        })?;
        // Only this process uses the directory now, so whatever is in
        // partial/ and trash/ is left over from one that is gone.
        for d in ["partial", "trash"] {
            let p = root.join(d);
            for e in fs::read_dir(&p)
                .map_err(|e| CacheError::io(format!("reading {}", p.display()), e))?
                .flatten()
            {
                let _ = fs::remove_file(e.path());
            }
        }
        let store = Store {
            root: root.to_path_buf(),
            high,
            low: low.min(high),
            index: Mutex::new(Index::default()),
            metrics,
            trash_seq: Default::default(),
            _lock: lock,
        };
        store.rebuild()?;
        Ok(Arc::new(store))
    }

    fn rebuild(&self) -> Result<(), CacheError> {
        let mut found: Vec<(SystemTime, Digest, u64)> = Vec::new();
        for alg in ["sha256", "sha512"] {
            let dir = self.root.join("blobs").join(alg);
            for e in fs::read_dir(&dir)
                .map_err(|e| CacheError::io(format!("reading {}", dir.display()), e))?
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(digest) = format!("{alg}:{name}").parse::<Digest>() else {
                    // Not ours (or a temp name): it can never be served.
                    let _ = fs::remove_file(e.path());
                    continue;
                };
                let Ok(md) = e.metadata() else { continue };
                if !md.is_file() {
                    continue;
                }
                found.push((
                    md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    digest,
                    md.len(),
                ));
            }
        }
        found.sort();
        let mut idx = self.lock();
        for (_, digest, size) in found {
            let meta = self.read_meta(&digest);
            idx.clock += 1;
            let last_use = idx.clock;
            idx.total += size;
            idx.entries.insert(
                digest,
                Entry {
                    size,
                    last_use,
                    pins: 0,
                    meta,
                    touched: Instant::now(),
                },
            );
        }
        // Metadata whose blob is gone is dropped.
        if let Ok(rd) = fs::read_dir(self.root.join("meta")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stem = name.trim_end_matches(".json").replacen('-', ":", 1);
                let keep = stem
                    .parse::<Digest>()
                    .is_ok_and(|d| idx.entries.contains_key(&d));
                if !keep {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        self.publish(&idx);
        tracing::info!(
            blobs = idx.entries.len(),
            bytes = idx.total,
            "cache index rebuilt"
        );
        drop(idx);
        self.evict(None);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // Every update leaves the index consistent before it can panic.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, idx: &Index) {
        self.metrics
            .stored_bytes
            .store(idx.total, Ordering::Relaxed);
        self.metrics
            .stored_blobs
            .store(idx.entries.len() as u64, Ordering::Relaxed);
    }

    /// Where a blob lives once committed.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs").join(d.algorithm()).join(d.hex())
    }

    /// Where a download of `d` is written.
    pub fn partial_path(&self, d: &Digest) -> PathBuf {
        self.root.join("partial").join(key(d))
    }

    /// The tag records' directory.
    pub fn tags_dir(&self) -> PathBuf {
        self.root.join("tags")
    }

    fn meta_path(&self, d: &Digest) -> PathBuf {
        self.root.join("meta").join(format!("{}.json", key(d)))
    }

    fn read_meta(&self, d: &Digest) -> Meta {
        fs::read(self.meta_path(d))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_meta(&self, d: &Digest, meta: &Meta) -> Result<(), CacheError> {
        let p = self.meta_path(d);
        if *meta == Meta::default() {
            let _ = fs::remove_file(&p);
            return Ok(());
        }
        let tmp = p.with_extension("tmp");
        let bytes = serde_json::to_vec(meta).unwrap_or_default();
        fs::write(&tmp, bytes)
            .and_then(|()| fs::rename(&tmp, &p))
            .map_err(|e| CacheError::io(format!("writing {}", p.display()), e))
    }

    /// Whether a blob of `size` bytes is kept after download; larger ones
    /// are streamed through to their readers and then dropped.
    pub fn keeps(&self, size: u64) -> bool {
        size <= self.high
    }

    /// Whether `d` is committed (without pinning it).
    pub fn contains(&self, d: &Digest) -> bool {
        self.lock().entries.contains_key(d)
    }

    /// Pins and opens blob `d`, marking it used; `None` if not cached.
    /// Blocking (opens a file).
    pub fn get(self: &Arc<Self>, d: &Digest) -> Result<Option<Pinned>, CacheError> {
        let (size, meta, touch) = {
            let mut idx = self.lock();
            idx.clock += 1;
            let now = idx.clock;
            let Some(e) = idx.entries.get_mut(d) else {
                return Ok(None);
            };
            e.pins += 1;
            e.last_use = now;
            let touch = e.touched.elapsed() >= TOUCH_EVERY;
            if touch {
                e.touched = Instant::now();
            }
            (e.size, e.meta.clone(), touch)
        };
        let pinned_without_file = Pinned {
            store: self.clone(),
            digest: d.clone(),
            file: Arc::new(match File::open(self.blob_path(d)) {
                Ok(f) => f,
                Err(e) => {
                    // Deleted behind our back: forget it, it is a miss.
                    tracing::warn!(digest = %d, error = %ember_error::chain(&e), "cached blob vanished");
                    let mut idx = self.lock();
                    if let Some(e) = idx.entries.remove(d) {
                        idx.total -= e.size;
                    }
                    self.publish(&idx);
                    return Ok(None);
                }
            }),
            size,
            meta,
        };
        if touch {
            // Recency across restarts; failure only costs LRU precision.
            let _ = pinned_without_file.file.set_modified(SystemTime::now());
        }
        Ok(Some(pinned_without_file))
    }

    /// Records that `d` is also available to clients of `upstream` (after
    /// that upstream confirmed it has it). Blocking.
    pub fn add_origin(&self, d: &Digest, upstream: &str, public: bool) -> Result<(), CacheError> {
        let meta = {
            let mut idx = self.lock();
            let Some(e) = idx.entries.get_mut(d) else {
                return Ok(());
            };
            if public {
                e.meta.private_to.clear();
            } else if !e.meta.private_to.iter().any(|u| u == upstream) {
                e.meta.private_to.push(upstream.to_string());
            }
            e.meta.clone()
        };
        self.write_meta(d, &meta)
    }

    /// Marks committed blob `d` as a snapshot artifact too (an upload
    /// whose bytes the cache already held); false if `d` is not
    /// committed. Blocking.
    pub fn mark_snapshot(&self, d: &Digest) -> Result<bool, CacheError> {
        let meta = {
            let mut idx = self.lock();
            let Some(e) = idx.entries.get_mut(d) else {
                return Ok(false);
            };
            if e.meta.snapshot {
                return Ok(true);
            }
            e.meta.snapshot = true;
            e.meta.clone()
        };
        self.write_meta(d, &meta)?;
        Ok(true)
    }

    /// Count and bytes of committed blobs whose metadata passes `f`
    /// (walks the index: for `/metrics`, not the request path).
    pub fn count_where(&self, f: impl Fn(&Meta) -> bool) -> (u64, u64) {
        let idx = self.lock();
        idx.entries
            .values()
            .filter(|e| f(&e.meta))
            .fold((0, 0), |(n, b), e| (n + 1, b + e.size))
    }

    /// A fresh name under `partial/` for an upload of `d` (several may
    /// run at once; each commits or removes its own file).
    pub fn upload_path(&self, d: &Digest) -> PathBuf {
        self.root.join("partial").join(format!(
            "{}.up{}",
            key(d),
            self.trash_seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Moves a verified download into the store and evicts as needed.
    /// The caller has verified the digest over `size` bytes and synced the
    /// file; a file of another length is refused (its digest was not
    /// computed over every byte that would be served). Blocking.
    pub fn commit(
        &self,
        d: &Digest,
        partial: &Path,
        size: u64,
        meta: Meta,
    ) -> Result<(), CacheError> {
        let on_disk = fs::metadata(partial)
            .map_err(|e| CacheError::io(format!("committing {}", partial.display()), e))?
            .len();
        if on_disk != size {
            return Err(CacheError::DigestMismatch {
                what: format!("committing {d}"),
                expected: format!("{size} verified bytes"),
                actual: format!("a file of {on_disk} bytes"),
            });
        }
        let mut meta = meta;
        // The same bytes committed again (an image blob that is also a
        // snapshot artifact) stay a snapshot artifact.
        if self.lock().entries.get(d).is_some_and(|e| e.meta.snapshot) {
            meta.snapshot = true;
        }
        self.write_meta(d, &meta)?;
        let dest = self.blob_path(d);
        {
            let mut idx = self.lock();
            fs::rename(partial, &dest)
                .map_err(|e| CacheError::io(format!("committing {}", dest.display()), e))?;
            idx.clock += 1;
            let last_use = idx.clock;
            if let Some(old) = idx.entries.insert(
                d.clone(),
                Entry {
                    size,
                    last_use,
                    pins: 0,
                    meta,
                    touched: Instant::now(),
                },
            ) {
                idx.total -= old.size;
            }
            idx.total += size;
            self.publish(&idx);
        }
        self.evict(Some(d));
        Ok(())
    }

    /// Stores a small document (a manifest) held in memory, after checking
    /// it against `d` (the caller has too, but this is where a document
    /// becomes a hit, so nothing unchecked gets past it). Blocking.
    pub fn put_bytes(&self, d: &Digest, bytes: &[u8], meta: Meta) -> Result<(), CacheError> {
        let mut v = d.verifier();
        v.update(bytes);
        v.finish().map_err(|actual| CacheError::DigestMismatch {
            what: format!("storing {d}"),
            expected: d.to_string(),
            actual: actual.to_string(),
        })?;
        if self.contains(d) || !self.keeps(bytes.len() as u64) {
            return Ok(());
        }
        let p = self.root.join("partial").join(format!(
            "{}.{}",
            key(d),
            self.trash_seq.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&p, bytes)
            .and_then(|()| File::open(&p)?.sync_data())
            .map_err(|e| CacheError::io(format!("writing {}", p.display()), e))?;
        self.commit(d, &p, bytes.len() as u64, meta)
    }

    /// Evicts least recently used, unpinned blobs while the total is over
    /// the high watermark, down to the low one. `keep` (the blob just
    /// committed) is spared. Blocking.
    pub fn evict(&self, keep: Option<&Digest>) {
        let mut doomed = Vec::new();
        {
            let mut idx = self.lock();
            if idx.total <= self.high {
                return;
            }
            let mut candidates: Vec<(u64, Digest)> = idx
                .entries
                .iter()
                .filter(|(d, e)| e.pins == 0 && Some(*d) != keep)
                .map(|(d, e)| (e.last_use, d.clone()))
                .collect();
            candidates.sort();
            for (_, d) in candidates {
                if idx.total <= self.low {
                    break;
                }
                let trash = self.root.join("trash").join(format!(
                    "{}.{}",
                    key(&d),
                    self.trash_seq.fetch_add(1, Ordering::Relaxed)
                ));
                // Renamed under the lock: once the entry is gone a new
                // download may commit the same path, and must not be hit
                // by this unlink.
                match fs::rename(self.blob_path(&d), &trash) {
                    Ok(()) => doomed.push(trash),
                    Err(e) => {
                        tracing::warn!(digest = %d, error = %ember_error::chain(&e), "evicting")
                    }
                }
                if let Some(e) = idx.entries.remove(&d) {
                    idx.total -= e.size;
                    Metrics::add(&self.metrics.evictions, 1);
                    Metrics::add(&self.metrics.evicted_bytes, e.size);
                    tracing::debug!(digest = %d, size = e.size, "evicted");
                }
                let _ = fs::remove_file(self.meta_path(&d));
            }
            self.publish(&idx);
        }
        for p in doomed {
            let _ = fs::remove_file(p);
        }
    }

    /// Makes sure the filesystem has room for `need` more bytes, evicting
    /// least recently used, unpinned blobs if it has not (the byte budget
    /// may be larger than the disk, or the disk shared); false if it still
    /// has not. Blocking.
    pub fn make_room(&self, need: u64) -> bool {
        let want = need.saturating_add(ROOM_MARGIN);
        let Some(free) = self.free_bytes() else {
            // Cannot tell: let the write find out.
            return true;
        };
        if free >= want {
            return true;
        }
        let freed = self.evict_lru(want - free);
        if freed > 0 {
            tracing::info!(need, freed, "evicted to make room on a full disk");
        }
        self.free_bytes().is_none_or(|f| f >= want)
    }

    /// Bytes an unprivileged writer may still put on the cache's
    /// filesystem.
    fn free_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.root).ok()?;
        Some(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    /// Evicts least recently used, unpinned blobs until `bytes` are freed
    /// or none is left; returns the bytes freed. Blocking.
    fn evict_lru(&self, bytes: u64) -> u64 {
        let mut doomed = Vec::new();
        let mut freed = 0;
        {
            let mut idx = self.lock();
            let mut candidates: Vec<(u64, Digest)> = idx
                .entries
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .map(|(d, e)| (e.last_use, d.clone()))
                .collect();
            candidates.sort();
            for (_, d) in candidates {
                if freed >= bytes {
                    break;
                }
                let trash = self.root.join("trash").join(format!(
                    "{}.{}",
                    key(&d),
                    self.trash_seq.fetch_add(1, Ordering::Relaxed)
                ));
                match fs::rename(self.blob_path(&d), &trash) {
                    Ok(()) => doomed.push(trash),
                    Err(e) => {
                        tracing::warn!(digest = %d, error = %ember_error::chain(&e), "evicting")
                    }
                }
                if let Some(e) = idx.entries.remove(&d) {
                    idx.total -= e.size;
                    freed += e.size;
                    Metrics::add(&self.metrics.evictions, 1);
                    Metrics::add(&self.metrics.evicted_bytes, e.size);
                }
                let _ = fs::remove_file(self.meta_path(&d));
            }
            self.publish(&idx);
        }
        for p in doomed {
            let _ = fs::remove_file(p);
        }
        freed
    }

    /// Bytes of committed blobs.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }
}
