//! Ember's node store: verified blobs, unpacked layers shared between images,
//! an index of images and names, garbage collection, and the pull pipeline
//! that fills it.
//!
//! Layout under the store root:
//!
//! ```text
//! blobs/sha256/<hex>   manifests, indexes and configs, verified, immutable
//! layers/<hex>/        one unpacked layer per diff_id, overlayfs whiteouts
//! trees/<hex>          the record of a layer's tree, written at commit (see `tree`)
//! index.json           images, names, layers, LRU clock (see `index`)
//! users/<id>.json      containers using an image, with their owner pid
//! lru/<hex>            empty marker per image; its mtime is the last use
//! snapshots/           checkpoint artifacts, manifests, unpacked copies (see `snapshot`)
//! tmp/<owner>-...      in-progress work; removed once its owner's lock is free
//! tmp/<owner>-lock     flock'ed by the open store that owns `tmp/<owner>-...` (see `tmp`)
//! lock                 flock for index updates
//! boot                 the boot id the unsynced-layer check last ran in
//! ```
//!
//! Invariants: a path under `blobs/` or `layers/` exists only once its
//! content was verified against its digest (it is built under `tmp/` and
//! renamed into place). The index only names layers and blobs that exist.
//! GC never removes an image whose user is alive. The root is mode 0700:
//! layers hold device nodes and setuid files as the image has them, and no
//! unprivileged host user may reach them.

mod error;
pub mod import;
pub mod index;
mod pull;
pub mod snapshot;
mod tmp;
pub mod tree;
pub mod unpack;
mod verify;

pub use error::StoreError;
pub use import::{
    ImportError, ImportFormat, ImportOptions, ImportPlan, ImportReport, ImportSource,
};
pub use index::{ImageRecord, Index, LayerRecord, LayerRef};
pub use pull::{
    PullGate, PullOptions, PullProgress, PullReport, PullTimings, SilentProgress, pull, pull_gated,
};
pub use snapshot::{SnapshotError, SnapshotGcReport, SnapshotManifest, StartUp};
pub use verify::{Problem, ProblemKind, VerifyReport};

use ember_oci::{Digest, Reference};
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use error::io;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A node store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// This open's claim on its `tmp/` entries; shared by clones, released
    /// when the last one is dropped (or the process dies).
    owner: std::sync::Arc<tmp::TmpOwner>,
}

/// An exclusive hold on the store's index; released on drop.
pub struct IndexLock {
    file: fs::File,
}

impl Drop for IndexLock {
    fn drop(&mut self) {
        // SAFETY: flock on a file descriptor we own; unlocking cannot fail
        // in a way we could act on.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// A claim on an image for one operation ([`Store::claim_image`]):
/// garbage collection leaves the image alone until this is dropped.
#[derive(Debug)]
#[must_use = "the claim ends when this is dropped"]
pub struct ImageClaim {
    path: PathBuf,
}

impl Drop for ImageClaim {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A row of `ember images`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageSummary {
    /// Names pointing at the image.
    pub names: Vec<String>,
    /// Manifest digest.
    pub manifest: Digest,
    /// Platform.
    pub platform: String,
    /// Unpacked bytes of its layers.
    pub bytes: u64,
    /// Number of layers.
    pub layers: usize,
    /// Unix milliseconds of last use.
    pub last_used_ms: u64,
    /// Whether a live container uses it.
    pub in_use: bool,
}

/// What a GC pass did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Bytes in layers and snapshots (artifacts and their unpacked
    /// copies) before.
    pub bytes_before: u64,
    /// Bytes in layers and snapshots after.
    pub bytes_after: u64,
    /// Of `bytes_after`, the snapshots' bytes.
    pub snapshot_bytes_after: u64,
    /// Images removed, by one of their names or digest.
    pub removed_images: Vec<String>,
    /// Layer directories removed.
    pub removed_layers: usize,
    /// Images kept because a container uses them.
    pub kept_in_use: usize,
    /// Snapshots of removed images and unreferenced snapshot artifacts
    /// that went with them (see `snapshot`).
    pub snapshots: SnapshotGcReport,
}

/// An image as [`Store::gc_in_order`] offers it to the caller's ordering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcCandidate {
    /// Manifest digest.
    pub manifest: Digest,
    /// The index digest it was pulled through, if any (a control plane
    /// may name the image by it).
    pub index: Option<Digest>,
    /// Its last use ([`Store::last_used_ms`], or the last restore of one
    /// of its snapshots if that was later).
    pub last_used_ms: u64,
    /// A live container uses it: it is never evicted.
    pub in_use: bool,
}

/// A container's claim on an image, so GC leaves it alone.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct UserRecord {
    image: Digest,
    pid: u32,
}

/// This kernel boot's id, which changes on every reboot.
pub(crate) fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

impl Store {
    /// Opens (creating if needed) the store at `root`, and removes work left
    /// in `tmp/` by processes that no longer exist (a `kill -9` mid-pull):
    /// each open holds a lock that its process's death releases, so this
    /// holds however soon the next process comes and whatever its pid.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        for d in ["blobs/sha256", "layers", "tmp", "users", "lru"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io("create", &p))?;
        }
        restrict_root(&root)?;
        let owner = std::sync::Arc::new(tmp::TmpOwner::new(&root.join("tmp"))?);
        let store = Store { root, owner };
        store.clean_tmp()?;
        store.drop_unsynced_from_earlier_boots()?;
        Ok(store)
    }

    /// Layers committed without a sync by a kernel that is no longer
    /// running may have lost data in a power cut: forget and delete them.
    /// Images that used them stay listed; their next pull or run fetches
    /// the missing layers again (see [`Store::missing_layers`]).
    ///
    /// `<root>/boot` remembers the boot this check last ran in, so every
    /// later open in the same boot (each `ember run`) skips parsing the
    /// index: unsynced layers of this boot are never stale.
    fn drop_unsynced_from_earlier_boots(&self) -> Result<(), StoreError> {
        let Some(boot) = boot_id() else {
            return Ok(());
        };
        let marker = self.root.join("boot");
        if fs::read_to_string(&marker).is_ok_and(|b| b == boot) {
            return Ok(());
        }
        let stale = |ix: &Index| {
            ix.layers
                .iter()
                .filter(|(_, l)| l.unsynced_boot.as_ref().is_some_and(|b| b != &boot))
                .map(|(d, _)| d.clone())
                .collect::<Vec<_>>()
        };
        if stale(&self.read_index()?).is_empty() {
            return fs::write(&marker, &boot).map_err(io("write", &marker));
        }
        let lock = self.lock()?;
        let mut ix = self.read_index()?;
        let gone = stale(&ix);
        for d in &gone {
            tracing::warn!(layer = %d, "layer was not synced before a reboot; discarding it");
            ix.layers.remove(d);
        }
        self.write_index(&lock, &ix)?;
        drop(lock);
        self.delete_layers(gone.iter().map(|d| self.layer_dir(d)).collect());
        fs::write(&marker, &boot).map_err(io("write", &marker))
    }

    /// Layers of `image` that are not in the store (discarded after a
    /// reboot, or removed by hand); an image with any is pulled again
    /// before it runs.
    pub fn missing_layers(&self, image: &ImageRecord) -> Vec<Digest> {
        image
            .layers
            .iter()
            .filter(|l| !self.layer_dir(&l.diff_id).is_dir())
            .map(|l| l.diff_id.clone())
            .collect()
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes an unprivileged writer could still put on the store's
    /// filesystem (`statvfs`: available blocks × fragment size), for the
    /// inventory a node reports. `None` if the filesystem cannot be asked.
    pub fn free_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.root).ok()?;
        st.blocks_available().checked_mul(st.fragment_size())
    }

    /// Where an unpacked layer lives.
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    /// Where the record of a layer's tree lives (beside, not inside, the
    /// layer directory, so overlay stacking sees only the layer).
    pub fn tree_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("trees").join(diff_id.hex())
    }

    /// Where a blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// A fresh path under `tmp/` tagged with this store's owner token, so a
    /// later process can tell it is abandoned once this store's lock is
    /// free (see the `tmp` module).
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{}-{}-{}-{what}", self.owner.token, now_ms(), n))
    }

    fn clean_tmp(&self) -> Result<(), StoreError> {
        tmp::clean(&self.root.join("tmp"), &self.owner.token).map(|_| ())
    }

    /// Takes the index lock (blocking until other processes release it).
    pub fn lock(&self) -> Result<IndexLock, StoreError> {
        let p = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io("open", &p))?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r != 0 {
            return Err(io("lock", &p)(std::io::Error::last_os_error()));
        }
        Ok(IndexLock { file })
    }

    /// The index file. Every update replaces it by rename, so its mtime
    /// changes with each one (a node agent watches it to report images
    /// other processes put in its store).
    pub fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Reads the index (an empty one if none was written yet). Readers do
    /// not need the lock: the file is only ever replaced by rename.
    pub fn read_index(&self) -> Result<Index, StoreError> {
        let p = self.root.join("index.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::CorruptIndex {
                path: p,
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(io("read", &p)(e)),
        }
    }

    /// Replaces the index atomically. Call with the lock held.
    pub fn write_index(&self, _lock: &IndexLock, index: &Index) -> Result<(), StoreError> {
        let p = self.root.join("index.json");
        let bytes = serde_json::to_vec_pretty(index).map_err(|e| StoreError::CorruptIndex {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        write_atomic(&self.tmp_path("index"), &p, &bytes)
    }

    /// Runs `f` on the index under the lock and writes back what it leaves.
    pub fn update_index<T>(
        &self,
        f: impl FnOnce(&mut Index) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let lock = self.lock()?;
        let mut index = self.read_index()?;
        let out = f(&mut index)?;
        self.write_index(&lock, &index)?;
        Ok(out)
    }

    /// Stores a small blob after checking it hashes to `digest`.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        let mut v = digest.verifier();
        v.update(bytes);
        if let Err(actual) = v.finish() {
            return Err(StoreError::DigestMismatch {
                reference: "(local)".into(),
                digest: digest.clone(),
                actual,
            });
        }
        let dest = self.blob_path(digest);
        if dest.exists() {
            return Ok(());
        }
        write_atomic(&self.tmp_path("blob"), &dest, bytes)
    }

    /// Reads a blob and re-verifies it (a bit flip on disk must not turn
    /// into a wrong config).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest);
        let b = fs::read(&p).map_err(io("read", &p))?;
        let mut v = digest.verifier();
        v.update(&b);
        v.finish().map_err(|actual| StoreError::DigestMismatch {
            reference: "(local store)".into(),
            digest: digest.clone(),
            actual,
        })?;
        Ok(b)
    }

    /// Finds a local image by name (`busybox`, `host/repo:tag`), by
    /// `name@digest` (manifest or index digest), or by a digest or a prefix
    /// of at least 6 hex digits of one.
    pub fn resolve(&self, index: &Index, name: &str) -> Result<ImageRecord, StoreError> {
        let hexish = name.strip_prefix("sha256:").unwrap_or(name);
        if hexish.len() >= 6 && hexish.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: Vec<&ImageRecord> = index
                .images
                .values()
                .filter(|i| i.manifest.hex().starts_with(hexish))
                .collect();
            if matches.len() == 1 {
                return Ok(matches[0].clone());
            }
        }
        let r: Reference = name.parse()?;
        if let Some(d) = r.digest() {
            return index
                .images
                .values()
                .find(|i| {
                    (&i.manifest == d || i.index.as_ref() == Some(d)) && i.repository == r.name()
                })
                .or_else(|| index.images.values().find(|i| &i.manifest == d))
                .cloned()
                .ok_or_else(|| StoreError::ImageUnknown(name.to_string()));
        }
        let d = index
            .refs
            .get(&r.to_string())
            .ok_or_else(|| StoreError::ImageUnknown(name.to_string()))?;
        index
            .images
            .get(d)
            .cloned()
            .ok_or_else(|| StoreError::ImageUnknown(name.to_string()))
    }

    /// Parses an image's config.
    pub fn image_config(
        &self,
        image: &ImageRecord,
    ) -> Result<oci_spec::image::ImageConfiguration, StoreError> {
        let b = self.read_blob(&image.config)?;
        serde_json::from_slice(&b).map_err(|e| StoreError::BadImage {
            reference: image.repository.clone(),
            detail: format!("config {}: {e}", image.config),
        })
    }

    /// The image's layer directories, lowest first.
    pub fn layer_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        image
            .layers
            .iter()
            .map(|l| self.layer_dir(&l.diff_id))
            .collect()
    }

    /// Moves an image to the front of the LRU order.
    ///
    /// The clock is the mtime of a marker file, not a field rewritten in
    /// the index: a run must not pay for taking the lock and fsyncing the
    /// whole index just to say it happened.
    pub fn touch(&self, manifest: &Digest) -> Result<(), StoreError> {
        let p = self.root.join("lru").join(manifest.hex());
        // Creating the file sets its mtime to now; so does rewriting it.
        fs::write(&p, b"").map_err(io("touch", &p))
    }

    /// The image's last use: its pull time or its marker's mtime.
    pub fn last_used_ms(&self, image: &ImageRecord) -> u64 {
        let marker = fs::metadata(self.root.join("lru").join(image.manifest.hex()))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        marker.max(image.last_used_ms)
    }

    /// Records that container `id`, owned by process `pid`, uses `image`.
    pub fn add_user(&self, id: &str, image: &Digest, pid: u32) -> Result<(), StoreError> {
        let rec = UserRecord {
            image: image.clone(),
            pid,
        };
        let p = self.user_path(id);
        let b = serde_json::to_vec(&rec).map_err(|e| StoreError::CorruptIndex {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        fs::write(&p, b).map_err(io("write", &p))
    }

    /// Drops container `id`'s claim.
    pub fn remove_user(&self, id: &str) {
        let _ = fs::remove_file(self.user_path(id));
    }

    /// [`Store::add_user`] for this process, dropped with the returned
    /// value: for a claim that lasts one operation (a run, a capture), so
    /// an early return cannot leave it behind.
    pub fn claim_image(&self, id: &str, image: &Digest) -> Result<ImageClaim, StoreError> {
        self.add_user(id, image, std::process::id())?;
        Ok(ImageClaim {
            path: self.user_path(id),
        })
    }

    fn user_path(&self, id: &str) -> PathBuf {
        self.root.join("users").join(format!("{id}.json"))
    }

    /// Containers using images, as (container id, image manifest), for a
    /// node's GC to see which images only idle runners hold.
    pub fn users(&self) -> Vec<(String, Digest)> {
        self.live_users()
    }

    /// Live users: (container id, image). Claims of dead processes are
    /// removed as they are found.
    fn live_users(&self) -> Vec<(String, Digest)> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(self.root.join("users")) else {
            return out;
        };
        for e in rd.flatten() {
            let path = e.path();
            let rec: Option<UserRecord> = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match rec {
                Some(r) if pid_alive(r.pid) => {
                    let id = path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    out.push((id, r.image));
                }
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        out
    }

    /// Lists images for `ember images`.
    pub fn images(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let ix = self.read_index()?;
        let users = self.live_users();
        let mut out: Vec<ImageSummary> = ix
            .images
            .values()
            .map(|i| ImageSummary {
                names: ix.names_of(&i.manifest),
                manifest: i.manifest.clone(),
                platform: i.platform.clone(),
                bytes: ix.bytes_of([i]),
                layers: i.layers.len(),
                last_used_ms: self.last_used_ms(i),
                in_use: users.iter().any(|(_, d)| d == &i.manifest),
            })
            .collect();
        out.sort_by_key(|i| std::cmp::Reverse(i.last_used_ms));
        Ok(out)
    }

    /// Removes a name; the image goes too when no name is left and no live
    /// container uses it. Naming an image by digest removes it with all its
    /// names. Returns the manifest digest if the image itself was removed.
    pub fn remove(&self, name: &str) -> Result<Option<Digest>, StoreError> {
        let users = self.live_users();
        let lock = self.lock()?;
        let mut ix = self.read_index()?;
        let img = self.resolve(&ix, name)?;
        let by_name = ix.refs.keys().any(|k| {
            name.parse::<Reference>()
                .map(|r| &r.to_string() == k)
                .unwrap_or(false)
        });
        let remaining: Vec<String> = if by_name {
            let key = name.parse::<Reference>()?.to_string();
            ix.refs.remove(&key);
            ix.names_of(&img.manifest)
        } else {
            Vec::new()
        };
        let mut removed = None;
        if remaining.is_empty() {
            if let Some((id, _)) = users.iter().find(|(_, d)| d == &img.manifest) {
                return Err(StoreError::InUse {
                    image: name.to_string(),
                    container: id.clone(),
                });
            }
            ix.refs.retain(|_, d| d != &img.manifest);
            ix.images.remove(&img.manifest);
            removed = Some(img.manifest.clone());
        }
        let dropped = self.drop_unreferenced(&mut ix);
        self.write_index(&lock, &ix)?;
        drop(lock);
        self.delete_layers(dropped);
        Ok(removed)
    }

    /// Removes layers and blobs no image refers to from the index, returning
    /// the layer directories to delete (after the index is written, so a
    /// crash in between leaves orphan directories, never dangling entries).
    fn drop_unreferenced(&self, ix: &mut Index) -> Vec<PathBuf> {
        let used: std::collections::BTreeSet<Digest> = ix
            .images
            .values()
            .flat_map(|i| i.layers.iter().map(|l| l.diff_id.clone()))
            .collect();
        let mut dirs = Vec::new();
        ix.layers.retain(|d, _| {
            let keep = used.contains(d);
            if !keep {
                dirs.push(self.layer_dir(d));
            }
            keep
        });
        // Orphan layer directories (from a crash between rename and index
        // write) are not in the index at all.
        if let Ok(rd) = fs::read_dir(self.root.join("layers")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let known = format!("sha256:{name}")
                    .parse::<Digest>()
                    .map(|d| used.contains(&d))
                    .unwrap_or(false);
                if !known && !dirs.contains(&e.path()) {
                    dirs.push(e.path());
                }
            }
        }
        // Records of layers that are gone or going.
        if let Ok(rd) = fs::read_dir(self.root.join("trees")) {
            for e in rd.flatten() {
                let layer = self.root.join("layers").join(e.file_name());
                if !layer.is_dir() || dirs.contains(&layer) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        // Blobs: keep manifests, indexes and configs of remaining images.
        let mut keep_blobs = std::collections::BTreeSet::new();
        for i in ix.images.values() {
            keep_blobs.insert(i.manifest.hex().to_string());
            keep_blobs.insert(i.config.hex().to_string());
            if let Some(x) = &i.index {
                keep_blobs.insert(x.hex().to_string());
            }
        }
        if let Ok(rd) = fs::read_dir(self.root.join("lru")) {
            for e in rd.flatten() {
                if !ix
                    .images
                    .keys()
                    .any(|d| *d.hex() == *e.file_name().to_string_lossy())
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.root.join("blobs/sha256")) {
            for e in rd.flatten() {
                if !keep_blobs.contains(&*e.file_name().to_string_lossy()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        dirs
    }

    fn delete_layers(&self, dirs: Vec<PathBuf>) {
        for d in dirs {
            // The record goes first: a record without its layer is
            // harmless, a layer without its record would fail verify.
            if let Some(name) = d.file_name() {
                let _ = fs::remove_file(self.root.join("trees").join(name));
            }
            // Rename first so a half-deleted layer is never visible under its
            // digest name, then delete at leisure.
            let t = self.tmp_path("gc");
            let target = if fs::rename(&d, &t).is_ok() { t } else { d };
            if let Err(e) = remove_any(&target) {
                tracing::warn!(path = %target.display(), error = %ember_error::chain(&e), "could not remove layer");
            }
        }
    }

    /// Least-recently-used eviction of whole images and snapshots: when
    /// layer and snapshot bytes exceed `high` bytes, remove images and
    /// snapshots (oldest use first, never an image a live container uses
    /// or a snapshot a restore holds) until they are at or below `low`.
    pub fn gc(&self, high: u64, low: u64) -> Result<GcReport, StoreError> {
        self.gc_in_order(high, low, |held| {
            let mut v: Vec<&GcCandidate> = held.iter().collect();
            v.sort_by_key(|c| c.last_used_ms);
            v.into_iter().map(|c| c.manifest.clone()).collect()
        })
    }

    /// Eviction in the caller's order: when layer and snapshot bytes
    /// exceed `high`, `order` is given every image held and returns the
    /// manifest digests that may be evicted, first to go first; they are
    /// removed in that order (never one a live container uses, whatever
    /// `order` says) until the bytes are at or below `low`. Images `order`
    /// leaves out are kept. Snapshots (see the `snapshot` module) are
    /// evicted beside them, least recently restored first and never one a
    /// restore holds: each step takes the older of the next image (by its
    /// last use) and the next snapshot. An image's snapshots go with it.
    /// Runs under the index lock, so `order` must be quick.
    pub fn gc_in_order(
        &self,
        high: u64,
        low: u64,
        order: impl FnOnce(&[GcCandidate]) -> Vec<Digest>,
    ) -> Result<GcReport, StoreError> {
        let mut users = self.live_users();
        let lock = self.lock()?;
        let mut ix = self.read_index()?;
        let mut snapshots = self.snapshot_holdings();
        // A restore reading a snapshot needs its image's layers too.
        for s in snapshots.iter().filter(|s| s.in_use) {
            for i in &s.images {
                users.push((format!("snapshot {}", s.names.join(",")), i.clone()));
            }
        }
        // A snapshot counts while its image is held (one of its images,
        // for an artifact several names share).
        let snapshot_bytes = |ix: &Index, snapshots: &[snapshot::SnapshotHeld]| -> u64 {
            snapshots
                .iter()
                .filter(|s| s.images.iter().any(|i| ix.images.contains_key(i)))
                .map(|s| s.bytes)
                .sum()
        };
        let total = |ix: &Index, s: &[snapshot::SnapshotHeld]| {
            ix.bytes_of(ix.images.values()) + snapshot_bytes(ix, s)
        };
        let mut report = GcReport {
            bytes_before: total(&ix, &snapshots),
            ..Default::default()
        };
        let mut evicted_snapshots = Vec::new();
        if report.bytes_before > high {
            // A restore uses its image's layers: an image is as recently
            // used as its most recently restored snapshot, so it never
            // goes (taking its snapshots with it) before they would.
            let mut restored: std::collections::BTreeMap<&Digest, u64> = Default::default();
            for s in &snapshots {
                for i in &s.images {
                    let t = restored.entry(i).or_default();
                    *t = (*t).max(s.last_used_ms);
                }
            }
            let held: Vec<GcCandidate> = ix
                .images
                .values()
                .map(|i| GcCandidate {
                    manifest: i.manifest.clone(),
                    index: i.index.clone(),
                    last_used_ms: self
                        .last_used_ms(i)
                        .max(restored.get(&i.manifest).copied().unwrap_or(0)),
                    in_use: users.iter().any(|(_, d)| d == &i.manifest),
                })
                .collect();
            let last_used: std::collections::BTreeMap<&Digest, u64> =
                held.iter().map(|c| (&c.manifest, c.last_used_ms)).collect();
            let order: Vec<(ImageRecord, u64)> = order(&held)
                .into_iter()
                .filter_map(|d| {
                    let used = last_used.get(&d).copied().unwrap_or(0);
                    ix.images.get(&d).cloned().map(|i| (i, used))
                })
                .collect();
            let mut images = order.into_iter().peekable();
            // Least recently restored first; `gone` marks the evicted.
            let mut gone = vec![false; snapshots.len()];
            let mut next = 0;
            loop {
                let alive: Vec<snapshot::SnapshotHeld> = snapshots
                    .iter()
                    .zip(&gone)
                    .filter(|(_, g)| !**g)
                    .map(|(s, _)| s.clone())
                    .collect();
                if total(&ix, &alive) <= low {
                    break;
                }
                // The next snapshot that may go: held by no restore, and
                // not going with its image anyway.
                while let Some(s) = snapshots.get(next) {
                    if !s.images.iter().any(|i| ix.images.contains_key(i)) {
                        next += 1;
                    } else if s.in_use {
                        report.snapshots.kept_in_use += 1;
                        next += 1;
                    } else {
                        break;
                    }
                }
                // The older of the next image and the next snapshot; on a
                // tie the snapshot (an image is at least as recent as its
                // snapshots' last restore, and a snapshot is the cheaper
                // loss: its image stays for a fresh start).
                let snapshot_first = match (images.peek(), snapshots.get(next)) {
                    (None, None) => break,
                    (Some(_), None) => false,
                    (None, Some(_)) => true,
                    (Some((_, img_used)), Some(s)) => s.last_used_ms <= *img_used,
                };
                if snapshot_first {
                    gone[next] = true;
                    evicted_snapshots.extend(snapshots[next].names.iter().cloned());
                    next += 1;
                    continue;
                }
                let Some((img, _)) = images.next() else { break };
                if users.iter().any(|(_, d)| d == &img.manifest) {
                    report.kept_in_use += 1;
                    continue;
                }
                let label = ix
                    .names_of(&img.manifest)
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| img.manifest.to_string());
                ix.refs.retain(|_, d| d != &img.manifest);
                ix.images.remove(&img.manifest);
                report.removed_images.push(label);
            }
            snapshots = snapshots
                .into_iter()
                .zip(gone)
                .filter(|(_, g)| !g)
                .map(|(s, _)| s)
                .collect();
        }
        let dropped = self.drop_unreferenced(&mut ix);
        report.removed_layers = dropped.len();
        report.snapshot_bytes_after = snapshot_bytes(&ix, &snapshots);
        report.bytes_after = ix.bytes_of(ix.images.values()) + report.snapshot_bytes_after;
        self.write_index(&lock, &ix)?;
        drop(lock);
        self.delete_layers(dropped);
        self.drop_snapshot_manifests(&evicted_snapshots);
        // A snapshot cannot be restored without its image's layers.
        let kept_in_use = report.snapshots.kept_in_use;
        match self.gc_snapshots(&std::collections::BTreeSet::new()) {
            Ok(s) => report.snapshots = s,
            Err(e) => tracing::warn!(error = %ember_error::chain(&e), "snapshot GC failed"),
        }
        report.snapshots.evicted_snapshots = evicted_snapshots;
        report.snapshots.kept_in_use = kept_in_use;
        Ok(report)
    }

    /// Writes the image's flattened filesystem into `dest` (created if
    /// missing), applying layers in order with whiteouts carried out.
    pub fn flatten(&self, image: &ImageRecord, dest: &Path) -> Result<(), StoreError> {
        fs::create_dir_all(dest).map_err(io("create", dest))?;
        for l in &image.layers {
            let dir = self.layer_dir(&l.diff_id);
            copy_layer_onto(&dir, dest).map_err(io("apply layer", &dir))?;
        }
        Ok(())
    }
}

/// Applies an overlay-format layer directory onto `dest`: whiteout devices
/// delete, opaque directories drop what was below, hardlinks within the
/// layer stay hardlinks.
fn copy_layer_onto(layer: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let mut links: std::collections::HashMap<(u64, u64), PathBuf> =
        std::collections::HashMap::new();
    let mut dirs: Vec<(PathBuf, fs::Metadata)> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let src_dir = layer.join(&rel);
        let dst_dir = dest.join(&rel);
        if !rel.as_os_str().is_empty()
            && is_opaque(&src_dir)
            && let Ok(rd) = fs::read_dir(&dst_dir)
        {
            for e in rd.flatten() {
                remove_any(&e.path())?;
            }
        }
        for e in fs::read_dir(&src_dir)? {
            let e = e?;
            let m = fs::symlink_metadata(e.path())?;
            let child_rel = rel.join(e.file_name());
            let target = dest.join(&child_rel);
            let ft = m.file_type();
            if ft.is_char_device() && m.rdev() == 0 {
                remove_any(&target)?;
                continue;
            }
            if ft.is_dir() {
                match fs::symlink_metadata(&target) {
                    Ok(t) if t.is_dir() => {}
                    Ok(_) => {
                        remove_any(&target)?;
                        fs::create_dir(&target)?;
                    }
                    Err(_) => fs::create_dir(&target)?,
                }
                dirs.push((target, m));
                stack.push(child_rel);
                continue;
            }
            remove_any(&target)?;
            if ft.is_file() && m.nlink() > 1 {
                if let Some(first) = links.get(&(m.dev(), m.ino())) {
                    fs::hard_link(first, &target)?;
                    continue;
                }
                links.insert((m.dev(), m.ino()), target.clone());
            }
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(e.path())?, &target)?;
            } else if ft.is_file() {
                fs::copy(e.path(), &target)?;
            } else if ft.is_char_device() || ft.is_block_device() {
                let kind = if ft.is_char_device() {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
                    target.as_os_str(),
                ))
                .map_err(|_| std::io::Error::other("NUL in path"))?;
                // SAFETY: valid NUL-terminated path.
                if unsafe { libc::mknod(c.as_ptr(), kind | (m.mode() & 0o777), m.rdev()) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if ft.is_fifo() {
                let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
                    target.as_os_str(),
                ))
                .map_err(|_| std::io::Error::other("NUL in path"))?;
                // SAFETY: valid NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), m.mode() & 0o777) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else {
                continue;
            }
            std::os::unix::fs::lchown(&target, Some(m.uid()), Some(m.gid()))?;
            if !ft.is_symlink() {
                fs::set_permissions(&target, fs::Permissions::from_mode(m.mode() & 0o7777))?;
            }
        }
    }
    for (d, m) in dirs {
        std::os::unix::fs::lchown(&d, Some(m.uid()), Some(m.gid()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    Ok(())
}

/// Makes the store root 0700 (creating it if needed). Layers hold device
/// nodes and setuid files exactly as images have them; only root may walk
/// into them. Containers see layers through overlay mounts, which do not
/// check the permissions of the directories above the layers.
fn restrict_root(root: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(root).map_err(io("create", root))?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io("chmod", root))
}

pub(crate) fn is_opaque(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
    else {
        return false;
    };
    let mut buf = [0u8; 4];
    // SAFETY: valid path and name strings and a buffer with its length.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n == 1 && buf[0] == b'y'
}

/// Removes a file, symlink or directory tree; missing is fine.
pub(crate) fn remove_any(p: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `tmp`, fsyncs, and renames it to `dest`.
pub(crate) fn write_atomic(tmp: &Path, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = fs::File::create(tmp).map_err(io("create", tmp))?;
    f.write_all(bytes).map_err(io("write", tmp))?;
    f.sync_all().map_err(io("fsync", tmp))?;
    drop(f);
    fs::rename(tmp, dest).map_err(io("rename", dest))
}
