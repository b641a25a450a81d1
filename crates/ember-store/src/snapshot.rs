//! Snapshot artifacts: checkpoint directories kept as content-addressed,
//! digest-verified blobs, with a small manifest per named snapshot.
//!
//! ```text
//! snapshots/blobs/<hex>            the checkpoint directory as tar + zstd; <hex> is
//!                                  the SHA-256 of these bytes (the artifact digest)
//! snapshots/manifests/<name>.json  a named snapshot: its artifact, image, sizes,
//!                                  the start-up it captured and the checkpoint's
//!                                  metadata (what a restore must match)
//! snapshots/unpacked/<hex>/        the artifact unpacked, made only after its bytes
//!                                  hashed to <hex>; what restores read
//! snapshots/unpacked/<hex>.stamp   the blob's size, mtime and inode when it was
//!                                  unpacked
//! ```
//!
//! Everything appears by rename from `tmp/`, so a crash leaves either the
//! whole object or a leftover in `tmp/` that the next open removes. The
//! manifest is written last: a snapshot is visible only once its artifact is.
//!
//! The unpacked copy is derived data, like an unpacked layer: it is
//! verified when it is made, not on every use (hashing the artifact would
//! cost every restore time proportional to its size). Its stamp makes a
//! replaced or rewritten blob (a new size, mtime or inode) invalidate it,
//! so the blob is verified again before anything of it is used;
//! `ember store verify` re-hashes every artifact ([`Store::verify_snapshots`]).
//!
//! GC ([`Store::gc_snapshots`]) removes snapshots whose image is no longer
//! in the store (their layers are gone, so they cannot be restored), and
//! artifacts and unpacked copies no manifest names.
//!
//! The store's byte budget ([`Store::gc_in_order`]) counts snapshots too:
//! an artifact's blob plus its unpacked copy (when there is one), once per
//! artifact however many names share it. Over the budget, snapshots and
//! images are evicted oldest use first, a snapshot's use being its last
//! restore (`snapshots/lru/<name>`, touched by [`Store::claim_snapshot`];
//! its creation before the first). A snapshot claimed by a live process
//! (a restore reading its unpacked copy: `snapshots/users/`) is never
//! evicted.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use ember_oci::Digest;
use sha2::{Digest as _, Sha256};

use crate::{Store, remove_any};

/// zstd level of artifacts: fast to write at capture time, and CRIU's
/// page images (mostly zero pages and code) compress well even at 3.
const ZSTD_LEVEL: i32 = 3;
/// Longest snapshot name.
const NAME_MAX: usize = 128;

/// Errors of snapshot artifacts.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A filesystem operation failed.
    #[error("{op} {path}", path = path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The artifact's bytes do not hash to its name.
    #[error(
        "snapshot artifact {digest}: digest mismatch (the file hashes to {actual}); it is corrupt or was tampered with and is not used"
    )]
    DigestMismatch {
        /// The digest the manifest names.
        digest: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// The artifact is not a tar + zstd stream this module wrote.
    #[error("snapshot artifact {digest}: {detail}")]
    Malformed {
        /// The artifact.
        digest: Digest,
        /// What is wrong.
        detail: String,
    },
    /// No snapshot of that name.
    #[error("no snapshot named {0:?} in the store (see `ember snapshot ls`)")]
    Unknown(String),
    /// A name that cannot be a file name.
    #[error(
        "invalid snapshot name {0:?}: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadName(String),
    /// A manifest that does not parse.
    #[error("snapshot manifest {path}: {detail}", path = path.display())]
    BadManifest {
        /// The file.
        path: PathBuf,
        /// The parse error.
        detail: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What a snapshot's first run must do when it is started fresh, and what
/// it was captured from.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StartUp {
    /// The start-up's program and arguments.
    pub argv: Vec<String>,
    /// Its complete environment (`KEY=VALUE`).
    pub env: Vec<String>,
    /// Its working directory.
    pub cwd: Option<String>,
    /// Its user and group ids, when not root.
    pub uid: Option<u32>,
    /// See `uid`.
    pub gid: Option<u32>,
    /// The agent's id of the exec that is parked in the checkpoint.
    pub exec_id: u64,
}

/// `snapshots/manifests/<name>.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotManifest {
    /// The snapshot's name.
    pub name: String,
    /// The artifact (SHA-256 of the tar + zstd bytes).
    pub artifact: Digest,
    /// Its size in bytes.
    pub artifact_bytes: u64,
    /// Bytes of the checkpoint directory it holds (regular files).
    pub unpacked_bytes: u64,
    /// The image it was taken of (manifest digest).
    pub image: Digest,
    /// A name of the image, for messages.
    pub image_name: String,
    /// The image's layers (diff_ids, lowest first), which a restore mounts.
    pub layers: Vec<Digest>,
    /// The start-up that was captured.
    pub start: StartUp,
    /// The checkpoint's metadata (`ember-checkpoint.json`: CRIU version,
    /// kernel, CPU features, runtime shape), as recorded; the runtime
    /// checks it, the store only keeps it.
    pub metadata: serde_json::Value,
    /// How long the capture took, milliseconds.
    pub capture_ms: u64,
    /// Unix milliseconds of creation.
    pub created_ms: u64,
}

/// What [`Store::gc_snapshots`] removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SnapshotGcReport {
    /// Snapshots whose image is gone.
    pub removed_snapshots: Vec<String>,
    /// Snapshots evicted for the store's byte budget (least recently
    /// restored first; see [`Store::gc_in_order`]).
    pub evicted_snapshots: Vec<String>,
    /// Snapshots over the budget kept because a restore holds them.
    pub kept_in_use: usize,
    /// Artifacts (blobs) no manifest names.
    pub removed_artifacts: usize,
    /// Unpacked copies no manifest names.
    pub removed_unpacked: usize,
    /// Bytes of artifacts freed.
    pub bytes_freed: u64,
}

/// A restore's hold on a snapshot ([`Store::claim_snapshot`]): while it
/// lives (and its process does), the store's GC does not evict the
/// snapshot. Dropping it releases the claim.
#[derive(Debug)]
pub struct SnapshotClaim {
    path: PathBuf,
}

impl Drop for SnapshotClaim {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// `snapshots/users/<claim>.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct ClaimRecord {
    name: String,
    artifact: Digest,
    pid: u32,
}

/// One artifact as the budget GC weighs it: every snapshot naming it.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotHeld {
    /// The snapshots naming the artifact (evicted together).
    pub names: Vec<String>,
    /// Their images: the artifact counts while one of them is held.
    pub images: BTreeSet<Digest>,
    /// Blob bytes plus the unpacked copy's, if there is one.
    pub bytes: u64,
    /// The latest restore (or creation) of any of the names.
    pub last_used_ms: u64,
    /// A live restore claims one of the names.
    pub in_use: bool,
}

/// One problem [`Store::verify_snapshots`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotProblem {
    /// The artifact file or manifest.
    pub object: String,
    /// What is wrong.
    pub detail: String,
    /// Whether `repair` removed it.
    pub repaired: bool,
}

/// Checks a snapshot name: it becomes a file name.
pub fn validate_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_owned()))
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// A writer that hashes what passes through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn digest_of(hash: Sha256) -> Digest {
    let hex = hex::encode(hash.finalize());
    format!("sha256:{hex}")
        .parse()
        .unwrap_or_else(|_| unreachable!("a SHA-256 in hex is a digest"))
}

impl Store {
    fn snapshots_dir(&self, sub: &str) -> Result<PathBuf, SnapshotError> {
        let p = self.root().join("snapshots").join(sub);
        fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        Ok(p)
    }

    /// Where an artifact's bytes live.
    pub fn artifact_path(&self, digest: &Digest) -> PathBuf {
        self.root().join("snapshots/blobs").join(digest.hex())
    }

    /// Where an artifact's verified unpacked copy lives.
    pub fn unpacked_path(&self, digest: &Digest) -> PathBuf {
        self.root().join("snapshots/unpacked").join(digest.hex())
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.root()
            .join("snapshots/manifests")
            .join(format!("{name}.json"))
    }

    /// Packs the checkpoint directory `dir` into an artifact (tar + zstd,
    /// named by its SHA-256), and moves `dir` itself into place as the
    /// artifact's unpacked copy (it is what the artifact holds, so it
    /// needs no verification). Returns the digest, the artifact's size
    /// and the bytes of the files packed. `dir` must be on the store's
    /// filesystem (under [`Store::tmp_path`]).
    pub fn put_snapshot_dir(&self, dir: &Path) -> Result<(Digest, u64, u64), SnapshotError> {
        let blobs = self.snapshots_dir("blobs")?;
        let unpacked = self.snapshots_dir("unpacked")?;
        let tmp = self.tmp_path("snapshot-blob");
        let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let result = (|| {
            let hw = HashingWriter {
                inner: io::BufWriter::new(file),
                hash: Sha256::new(),
                bytes: 0,
            };
            let enc = zstd::Encoder::new(hw, ZSTD_LEVEL).map_err(io_err("compress", &tmp))?;
            let mut builder = tar::Builder::new(enc);
            let files_bytes = pack_tree(&mut builder, dir).map_err(io_err("pack", dir))?;
            let enc = builder.into_inner().map_err(io_err("pack", dir))?;
            let mut hw = enc.finish().map_err(io_err("compress", &tmp))?;
            hw.flush().map_err(io_err("write", &tmp))?;
            let (hash, bytes) = (hw.hash, hw.bytes);
            let file = hw
                .inner
                .into_inner()
                .map_err(|e| io_err("write", &tmp)(e.into_error()))?;
            file.sync_all().map_err(io_err("fsync", &tmp))?;
            Ok::<_, SnapshotError>((digest_of(hash), bytes, files_bytes))
        })();
        let (digest, bytes, files_bytes) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let dest = blobs.join(digest.hex());
        fs::rename(&tmp, &dest).map_err(io_err("rename", &dest))?;
        let target = unpacked.join(digest.hex());
        if target.exists() {
            // The same checkpoint bytes twice: the copy there is as good.
            let _ = remove_any(dir);
        } else {
            fs::rename(dir, &target).map_err(io_err("rename", &target))?;
        }
        write_stamp(&dest, &stamp_path(&target))?;
        Ok((digest, bytes, files_bytes))
    }

    /// Takes an artifact from elsewhere (the cluster cache): streams
    /// `reader` to a file under `tmp/` while hashing it and renames it into
    /// `snapshots/blobs/` only if it hashes to `digest` and has
    /// `expected_bytes` (when given). A read error, a short or long stream
    /// or a mismatch removes the file and leaves the store as it was.
    /// Returns the bytes taken. The artifact is collectable until a
    /// manifest names it: use [`Store::import_snapshot`] to do both.
    pub fn import_snapshot_artifact(
        &self,
        reader: impl Read,
        digest: &Digest,
        expected_bytes: Option<u64>,
    ) -> Result<u64, SnapshotError> {
        let blobs = self.snapshots_dir("blobs")?;
        let tmp = self.tmp_path("snapshot-import");
        let result = (|| {
            let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
            let mut hashing = Hashing {
                inner: reader,
                hash: Sha256::new(),
                bytes: 0,
            };
            let mut w = io::BufWriter::new(file);
            io::copy(&mut hashing, &mut w).map_err(io_err("receive", &tmp))?;
            let file = w
                .into_inner()
                .map_err(|e| io_err("write", &tmp)(e.into_error()))?;
            let (hash, bytes) = (hashing.hash, hashing.bytes);
            if let Some(want) = expected_bytes
                && want != bytes
            {
                return Err(SnapshotError::Malformed {
                    digest: digest.clone(),
                    detail: format!(
                        "{bytes} bytes arrived but the manifest says {want} (truncated or padded); it is not used"
                    ),
                });
            }
            let actual = digest_of(hash);
            if &actual != digest {
                return Err(SnapshotError::DigestMismatch {
                    digest: digest.clone(),
                    actual,
                });
            }
            file.sync_all().map_err(io_err("fsync", &tmp))?;
            Ok(bytes)
        })();
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let dest = blobs.join(digest.hex());
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename", &dest)(e));
        }
        Ok(bytes)
    }

    /// [`Store::import_snapshot_artifact`], then the manifest: the
    /// snapshot appears whole or not at all. The manifest is checked
    /// first (its name), so a bad one costs no download.
    pub fn import_snapshot(
        &self,
        manifest: &SnapshotManifest,
        reader: impl Read,
    ) -> Result<u64, SnapshotError> {
        validate_name(&manifest.name)?;
        let bytes = self.import_snapshot_artifact(
            reader,
            &manifest.artifact,
            Some(manifest.artifact_bytes),
        )?;
        self.put_snapshot(manifest)?;
        Ok(bytes)
    }

    /// Writes a snapshot's manifest (replacing one of the same name; the
    /// artifact it named is then collectable).
    pub fn put_snapshot(&self, manifest: &SnapshotManifest) -> Result<(), SnapshotError> {
        validate_name(&manifest.name)?;
        self.snapshots_dir("manifests")?;
        let dest = self.manifest_path(&manifest.name);
        let bytes =
            serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::BadManifest {
                path: dest.clone(),
                detail: e.to_string(),
            })?;
        crate::write_atomic(&self.tmp_path("snapshot-manifest"), &dest, &bytes).map_err(|e| {
            SnapshotError::Io {
                op: "write",
                path: dest.clone(),
                source: io::Error::other(ember_error::chain(&e).to_string()),
            }
        })
    }

    /// Claims `manifest`'s snapshot for a restore by this process: the
    /// budget GC does not evict it while the claim lives, and the restore
    /// counts as its last use (least recently restored snapshots go
    /// first). Take it before [`Store::unpack_snapshot`]; drop it once
    /// the restore no longer reads the unpacked copy. A GC pass that read
    /// the claims just before this one may still remove the snapshot: the
    /// restore then fails on the missing files (and falls back) rather
    /// than reading half of them.
    pub fn claim_snapshot(
        &self,
        manifest: &SnapshotManifest,
    ) -> Result<SnapshotClaim, SnapshotError> {
        let users = self.snapshots_dir("users")?;
        let lru = self.snapshots_dir("lru")?.join(&manifest.name);
        let path = users.join(format!(
            "{}.json",
            self.tmp_path("claim")
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let rec = ClaimRecord {
            name: manifest.name.clone(),
            artifact: manifest.artifact.clone(),
            pid: std::process::id(),
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| SnapshotError::BadManifest {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        fs::write(&path, bytes).map_err(io_err("write", &path))?;
        let claim = SnapshotClaim { path };
        fs::write(&lru, crate::now_ms().to_string()).map_err(io_err("write", &lru))?;
        Ok(claim)
    }

    /// When snapshot `name` was last restored ([`Store::claim_snapshot`]),
    /// Unix milliseconds; 0 if never.
    pub fn snapshot_last_restored_ms(&self, name: &str) -> u64 {
        fs::read_to_string(self.root().join("snapshots/lru").join(name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Artifacts live processes claim ([`Store::claim_snapshot`]), by
    /// snapshot name; claims of dead processes are removed.
    fn claimed_snapshots(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Ok(rd) = fs::read_dir(self.root().join("snapshots/users")) else {
            return out;
        };
        for e in rd.flatten() {
            let rec: Option<ClaimRecord> = fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match rec {
                Some(r) if crate::pid_alive(r.pid) => {
                    out.insert(r.name);
                }
                // A claim being written is empty for a moment: only a
                // parsed claim of a dead process is removed.
                Some(_) => {
                    let _ = fs::remove_file(e.path());
                }
                None => {}
            }
        }
        out
    }

    /// The snapshots as the budget GC weighs them, one entry per artifact.
    pub(crate) fn snapshot_holdings(&self) -> Vec<SnapshotHeld> {
        let claimed = self.claimed_snapshots();
        let mut by_artifact: std::collections::BTreeMap<Digest, SnapshotHeld> =
            std::collections::BTreeMap::new();
        for m in self.snapshots().unwrap_or_default() {
            let used = self.snapshot_last_restored_ms(&m.name).max(m.created_ms);
            let in_use = claimed.contains(&m.name);
            let held = by_artifact.entry(m.artifact.clone()).or_insert_with(|| {
                let blob = fs::metadata(self.artifact_path(&m.artifact)).map_or(0, |x| x.len());
                let unpacked = if self.unpacked_path(&m.artifact).is_dir() {
                    m.unpacked_bytes
                } else {
                    0
                };
                SnapshotHeld {
                    names: Vec::new(),
                    images: BTreeSet::new(),
                    bytes: blob + unpacked,
                    last_used_ms: 0,
                    in_use: false,
                }
            });
            held.names.push(m.name);
            held.images.insert(m.image);
            held.last_used_ms = held.last_used_ms.max(used);
            held.in_use |= in_use;
        }
        let mut v: Vec<SnapshotHeld> = by_artifact.into_values().collect();
        v.sort_by_key(|h| h.last_used_ms);
        v
    }

    /// Removes the manifests of snapshots `names` (the budget GC's
    /// evictions); [`Store::gc_snapshots_of`] then frees their files.
    pub(crate) fn drop_snapshot_manifests(&self, names: &[String]) {
        for n in names {
            let _ = fs::remove_file(self.manifest_path(n));
        }
    }

    /// Reads the manifest of snapshot `name`.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotManifest, SnapshotError> {
        validate_name(name)?;
        let p = self.manifest_path(name);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SnapshotError::Unknown(name.to_owned()));
            }
            Err(e) => return Err(io_err("read", &p)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| SnapshotError::BadManifest {
            path: p,
            detail: e.to_string(),
        })
    }

    /// All snapshots, by name. Unreadable manifests are skipped (logged).
    pub fn snapshots(&self) -> Result<Vec<SnapshotManifest>, SnapshotError> {
        let dir = self.root().join("snapshots/manifests");
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &dir)(e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(name) = name.strip_suffix(".json") else {
                continue;
            };
            match self.snapshot(name) {
                Ok(m) => out.push(m),
                Err(e) => {
                    tracing::warn!(error = %ember_error::chain(&e), "skipping snapshot manifest")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes snapshot `name`'s manifest, then whatever artifact and
    /// unpacked copy no other snapshot names.
    pub fn remove_snapshot(&self, name: &str) -> Result<SnapshotGcReport, SnapshotError> {
        self.snapshot(name)?;
        let p = self.manifest_path(name);
        fs::remove_file(&p).map_err(io_err("remove", &p))?;
        self.gc_snapshots_of(None)
    }

    /// The verified unpacked checkpoint directory of `manifest`'s
    /// artifact: the copy already there if its blob is unchanged since it
    /// was made, else the blob is hashed while it is unpacked under `tmp/`
    /// and the result renamed into place only if the digest matches. A
    /// mismatch removes what was unpacked and returns
    /// [`SnapshotError::DigestMismatch`]. Returns the directory and
    /// whether it had to be unpacked now.
    pub fn unpack_snapshot(
        &self,
        manifest: &SnapshotManifest,
    ) -> Result<(PathBuf, bool), SnapshotError> {
        let digest = &manifest.artifact;
        let blob = self.artifact_path(digest);
        let target = self.unpacked_path(digest);
        let stamp = stamp_path(&target);
        let meta = fs::metadata(&blob).map_err(io_err("read", &blob))?;
        if target.is_dir() && fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_of(&meta)) {
            return Ok((target, false));
        }
        // A stale copy (its blob changed) must not be used, whatever the
        // blob turns out to hold.
        let _ = fs::remove_file(&stamp);
        let _ = remove_any(&target);
        self.snapshots_dir("unpacked")?;
        let tmp = self.tmp_path("snapshot-unpack");
        let result = unpack_verified(&blob, &tmp, digest);
        if let Err(e) = result {
            let _ = remove_any(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&tmp, &target) {
            let _ = remove_any(&tmp);
            // A concurrent run unpacked (and verified) it first.
            if target.is_dir() {
                return Ok((target, false));
            }
            return Err(io_err("rename", &target)(e));
        }
        write_stamp(&blob, &stamp)?;
        Ok((target, true))
    }

    /// Removes snapshots whose image is not in `images` (manifest digests
    /// of the images in the store; `None` keeps every snapshot whatever
    /// its image), then artifacts and unpacked copies that no remaining
    /// snapshot names.
    pub fn gc_snapshots_of(
        &self,
        images: Option<&BTreeSet<Digest>>,
    ) -> Result<SnapshotGcReport, SnapshotError> {
        let mut report = SnapshotGcReport::default();
        let mut keep = BTreeSet::new();
        for m in self.snapshots()? {
            if images.is_some_and(|i| !i.contains(&m.image)) {
                let p = self.manifest_path(&m.name);
                fs::remove_file(&p).map_err(io_err("remove", &p))?;
                report.removed_snapshots.push(m.name);
            } else {
                keep.insert(m.artifact.hex().to_owned());
            }
        }
        let names: BTreeSet<String> = self.snapshots()?.into_iter().map(|m| m.name).collect();
        if let Ok(rd) = fs::read_dir(self.root().join("snapshots/lru")) {
            for e in rd.flatten() {
                if !names.contains(&*e.file_name().to_string_lossy()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let blobs = self.root().join("snapshots/blobs");
        if let Ok(rd) = fs::read_dir(&blobs) {
            for e in rd.flatten() {
                if !keep.contains(&*e.file_name().to_string_lossy()) {
                    report.bytes_freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                    let _ = fs::remove_file(e.path());
                    report.removed_artifacts += 1;
                }
            }
        }
        let unpacked = self.root().join("snapshots/unpacked");
        if let Ok(rd) = fs::read_dir(&unpacked) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let hex = name.strip_suffix(".stamp").unwrap_or(&name);
                if !keep.contains(hex) {
                    if !name.ends_with(".stamp") {
                        report.removed_unpacked += 1;
                    }
                    // Renamed away first, so a half-removed copy is never
                    // seen under its digest.
                    let t = self.tmp_path("snapshot-gc");
                    let target = if fs::rename(e.path(), &t).is_ok() {
                        t
                    } else {
                        e.path()
                    };
                    if let Err(err) = remove_any(&target) {
                        tracing::warn!(path = %target.display(), error = %ember_error::chain(&err), "could not remove");
                    }
                }
            }
        }
        Ok(report)
    }

    /// GC of snapshots as the store's GC runs it: snapshots of images no
    /// longer in the index go, then unreferenced artifacts. `extra_keep`
    /// names further images to treat as present.
    pub fn gc_snapshots(
        &self,
        extra_keep: &BTreeSet<Digest>,
    ) -> Result<SnapshotGcReport, SnapshotError> {
        let mut images: BTreeSet<Digest> = self
            .read_index()
            .map_err(|e| SnapshotError::Io {
                op: "read index",
                path: self.root().join("index.json"),
                source: io::Error::other(ember_error::chain(&e).to_string()),
            })?
            .images
            .keys()
            .cloned()
            .collect();
        images.extend(extra_keep.iter().cloned());
        self.gc_snapshots_of(Some(&images))
    }

    /// Re-hashes every artifact and checks that every manifest's artifact
    /// exists. With `repair`, corrupt artifacts are removed with their
    /// unpacked copies and the snapshots that name them.
    pub fn verify_snapshots(&self, repair: bool) -> Result<Vec<SnapshotProblem>, SnapshotError> {
        let mut problems = Vec::new();
        let manifests = self.snapshots()?;
        let blobs = self.root().join("snapshots/blobs");
        let mut bad = BTreeSet::new();
        if let Ok(rd) = fs::read_dir(&blobs) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else {
                    problems.push(SnapshotProblem {
                        object: e.path().display().to_string(),
                        detail: "not named by a digest".into(),
                        repaired: repair && fs::remove_file(e.path()).is_ok(),
                    });
                    continue;
                };
                let path = e.path();
                let file = File::open(&path).map_err(io_err("open", &path))?;
                let mut h = Hashing {
                    inner: BufReader::new(file),
                    hash: Sha256::new(),
                    bytes: 0,
                };
                io::copy(&mut h, &mut io::sink()).map_err(io_err("read", &path))?;
                let actual = digest_of(h.hash);
                if actual != digest {
                    bad.insert(digest.clone());
                    problems.push(SnapshotProblem {
                        object: format!("snapshot artifact {digest}"),
                        detail: format!("hashes to {actual}"),
                        repaired: false,
                    });
                }
            }
        }
        for m in &manifests {
            if !self.artifact_path(&m.artifact).is_file() {
                bad.insert(m.artifact.clone());
                problems.push(SnapshotProblem {
                    object: format!("snapshot {}", m.name),
                    detail: format!("artifact {} is missing", m.artifact),
                    repaired: false,
                });
            }
        }
        if repair && !bad.is_empty() {
            for m in manifests.iter().filter(|m| bad.contains(&m.artifact)) {
                let _ = fs::remove_file(self.manifest_path(&m.name));
            }
            for d in &bad {
                let _ = fs::remove_file(self.artifact_path(d));
                let u = self.unpacked_path(d);
                let _ = fs::remove_file(stamp_path(&u));
                let _ = remove_any(&u);
            }
            for p in &mut problems {
                p.repaired = true;
            }
        }
        Ok(problems)
    }
}

fn stamp_path(unpacked: &Path) -> PathBuf {
    let mut s = unpacked.as_os_str().to_owned();
    s.push(".stamp");
    PathBuf::from(s)
}

fn stamp_of(m: &fs::Metadata) -> String {
    format!("{} {} {} {}", m.len(), m.mtime(), m.mtime_nsec(), m.ino())
}

fn write_stamp(blob: &Path, stamp: &Path) -> Result<(), SnapshotError> {
    let m = fs::metadata(blob).map_err(io_err("read", blob))?;
    fs::write(stamp, stamp_of(&m)).map_err(io_err("write", stamp))
}

/// Appends every entry under `root` (sorted, so equal trees pack to equal
/// bytes), with owners, modes, mtimes, device numbers and extended
/// attributes (overlayfs's opaque markers, as PAX `SCHILY.xattr.` records).
/// Returns the bytes of the regular files.
fn pack_tree<W: Write>(b: &mut tar::Builder<W>, root: &Path) -> io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        // Pushed in reverse so directories are visited in name order.
        let mut subdirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            let path = root.join(&rel);
            let m = fs::symlink_metadata(&path)?;
            let xattrs = list_xattrs(&path)?;
            if !xattrs.is_empty() {
                let records: Vec<(String, Vec<u8>)> = xattrs.into_iter().map(pax_record).collect();
                b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
            }
            let mut h = tar::Header::new_gnu();
            h.set_metadata_in_mode(&m, tar::HeaderMode::Complete);
            let ft = m.file_type();
            if ft.is_dir() {
                b.append_data(&mut h, &rel, io::empty())?;
                subdirs.push(rel);
            } else if ft.is_file() {
                total += m.len();
                b.append_data(&mut h, &rel, File::open(&path)?)?;
            } else if ft.is_symlink() {
                h.set_size(0);
                b.append_link(&mut h, &rel, fs::read_link(&path)?)?;
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                h.set_entry_type(if ft.is_char_device() {
                    tar::EntryType::Char
                } else if ft.is_block_device() {
                    tar::EntryType::Block
                } else {
                    tar::EntryType::Fifo
                });
                let dev = m.rdev();
                h.set_device_major(libc::major(dev))?;
                h.set_device_minor(libc::minor(dev))?;
                h.set_size(0);
                b.append_data(&mut h, &rel, io::empty())?;
            }
            // Sockets are not part of a checkpoint (CRIU recreates them).
        }
        stack.extend(subdirs.into_iter().rev());
    }
    b.finish()?;
    Ok(total)
}

/// PAX key of an extended attribute whose value is hex-encoded: the tar
/// crate's reader splits PAX data at newlines before it looks at record
/// lengths, so a binary value holding a `\n` byte (overlayfs's
/// `trusted.overlay.origin` file handles do, now and then) would make the
/// whole artifact unreadable.
const HEX_XATTR: &str = "EMBER.xattr.hex.";

/// The PAX record of one extended attribute: GNU tar's `SCHILY.xattr.`
/// form when the value has no newline, [`HEX_XATTR`] otherwise.
fn pax_record((name, value): (String, Vec<u8>)) -> (String, Vec<u8>) {
    if value.contains(&b'\n') {
        (
            format!("{HEX_XATTR}{name}"),
            hex::encode(&value).into_bytes(),
        )
    } else {
        (format!("SCHILY.xattr.{name}"), value)
    }
}

/// The extended attribute a PAX record carries, if it is one.
fn xattr_of(key: &str, value: &[u8]) -> io::Result<Option<(String, Vec<u8>)>> {
    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
        return Ok(Some((name.to_owned(), value.to_vec())));
    }
    if let Some(name) = key.strip_prefix(HEX_XATTR) {
        let v = hex::decode(value)
            .map_err(|e| io::Error::other(format!("extended attribute {name}: {e}")))?;
        return Ok(Some((name.to_owned(), v)));
    }
    Ok(None)
}

/// A file's extended attributes (not following symlinks).
fn list_xattrs(p: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let c = crate::unpack::cstr(p)?;
    let mut names = vec![0u8; 4096];
    // SAFETY: a valid path and a buffer with its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let cname = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL"))?;
        let mut val = vec![0u8; 64 * 1024];
        // SAFETY: valid path, name and a buffer with its length.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if m < 0 {
            return Err(io::Error::last_os_error());
        }
        val.truncate(m as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), val));
    }
    Ok(out)
}

/// Unpacks the artifact `blob` into `dest` (created) while hashing it, and
/// fails unless it hashes to `digest`; the caller removes `dest` on error.
fn unpack_verified(blob: &Path, dest: &Path, digest: &Digest) -> Result<(), SnapshotError> {
    let file = File::open(blob).map_err(io_err("open", blob))?;
    let mut hashing = Hashing {
        inner: file,
        hash: Sha256::new(),
        bytes: 0,
    };
    let malformed = |detail: String| SnapshotError::Malformed {
        digest: digest.clone(),
        detail,
    };
    fs::create_dir_all(dest).map_err(io_err("create", dest))?;
    let unpacked = (|| -> io::Result<()> {
        let dec = zstd::Decoder::new(&mut hashing)?;
        let mut archive = tar::Archive::new(dec);
        let mut dirs = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            unpack_entry(&mut entry, dest, &mut dirs)?;
        }
        // Directory times last: creating entries inside moved them.
        for (d, mtime) in dirs.into_iter().rev() {
            crate::unpack::set_mtime(&d, mtime)?;
        }
        let mut dec = archive.into_inner();
        io::copy(&mut dec, &mut io::sink())?;
        Ok(())
    })();
    // Whatever the stream held, hash the file to its end: the digest
    // decides, a parse error of tampered bytes is only a symptom.
    let _ = io::copy(&mut hashing, &mut io::sink());
    let actual = digest_of(hashing.hash);
    if &actual != digest {
        return Err(SnapshotError::DigestMismatch {
            digest: digest.clone(),
            actual,
        });
    }
    unpacked.map_err(|e| malformed(format!("cannot unpack: {e}")))
}

fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    dirs: &mut Vec<(PathBuf, i64)>,
) -> io::Result<()> {
    let rel = entry.path()?.into_owned();
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(io::Error::other(format!("unsafe path {}", rel.display())));
    }
    let path = dest.join(&rel);
    let mut xattrs = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Ok(key) = ext.key()
                && let Some(x) = xattr_of(key, ext.value_bytes())?
            {
                xattrs.push(x);
            }
        }
    }
    let h = entry.header();
    let mode = h.mode()? & 0o7777;
    let (uid, gid) = (h.uid()? as u32, h.gid()? as u32);
    let mtime = h.mtime()? as i64;
    let kind = h.entry_type();
    match kind {
        tar::EntryType::Directory => {
            fs::create_dir_all(&path)?;
            dirs.push((path.clone(), mtime));
        }
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let mut f = File::create(&path)?;
            io::copy(entry, &mut f)?;
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name()?
                .ok_or_else(|| io::Error::other("symlink without target"))?;
            std::os::unix::fs::symlink(target, &path)?;
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let t = match kind {
                tar::EntryType::Char => libc::S_IFCHR,
                tar::EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            let dev = libc::makedev(
                h.device_major()?.unwrap_or(0),
                h.device_minor()?.unwrap_or(0),
            );
            crate::unpack::mknod(&path, t | mode, dev)?;
        }
        other => return Err(io::Error::other(format!("unexpected entry type {other:?}"))),
    }
    std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
    if kind != tar::EntryType::Symlink {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        for (name, value) in xattrs {
            crate::unpack::set_xattr(&path, &name, &value)?;
        }
        if kind != tar::EntryType::Directory {
            crate::unpack::set_mtime(&path, mtime)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::now_ms;

    fn manifest(store: &Store, name: &str, digest: Digest, image: Digest) -> SnapshotManifest {
        let _ = store;
        SnapshotManifest {
            name: name.into(),
            artifact: digest,
            artifact_bytes: 0,
            unpacked_bytes: 0,
            image,
            image_name: "img".into(),
            layers: Vec::new(),
            start: StartUp::default(),
            metadata: serde_json::json!({"format": 1}),
            capture_ms: 0,
            created_ms: now_ms(),
        }
    }

    /// A checkpoint-like tree: files, a nested directory, a symlink, a
    /// whiteout device and an opaque marker (needs root for the last two).
    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("criu")).unwrap();
        fs::write(dir.join("criu/pages-1.img"), vec![7u8; 100_000]).unwrap();
        fs::write(dir.join("ember-checkpoint.json"), b"{}").unwrap();
        fs::create_dir_all(dir.join("upper/opq")).unwrap();
        fs::write(dir.join("upper/warm"), b"warm\n").unwrap();
        std::os::unix::fs::symlink("warm", dir.join("upper/link")).unwrap();
        let c = crate::unpack::cstr(&dir.join("upper/gone")).unwrap();
        // SAFETY: valid path; a 0:0 character device is an overlay whiteout.
        assert_eq!(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) }, 0);
        let c = crate::unpack::cstr(&dir.join("upper/opq")).unwrap();
        // SAFETY: valid path, name and a 1-byte value.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        // A binary value with newlines, as overlayfs's file handles in
        // `trusted.overlay.origin` can be.
        let c = crate::unpack::cstr(&dir.join("upper/warm")).unwrap();
        // SAFETY: valid path, name and value of the given length.
        let r = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                c"trusted.overlay.origin".as_ptr(),
                ORIGIN.as_ptr().cast(),
                ORIGIN.len(),
                0,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    /// An xattr value with newline and NUL bytes.
    const ORIGIN: &[u8] = b"\x00\xfb\n\n=1 \x0a\xff";

    fn same_tree(a: &Path, b: &Path) {
        for rel in ["criu/pages-1.img", "ember-checkpoint.json", "upper/warm"] {
            assert_eq!(
                fs::read(a.join(rel)).unwrap(),
                fs::read(b.join(rel)).unwrap()
            );
        }
        assert_eq!(
            fs::read_link(b.join("upper/link")).unwrap(),
            Path::new("warm")
        );
        let m = fs::symlink_metadata(b.join("upper/gone")).unwrap();
        assert!(m.file_type().is_char_device() && m.rdev() == 0);
        assert!(crate::is_opaque(&b.join("upper/opq")));
        let origin = list_xattrs(&b.join("upper/warm")).unwrap();
        assert!(
            origin
                .iter()
                .any(|(k, v)| k == "trusted.overlay.origin" && v == ORIGIN),
            "{origin:?}"
        );
    }

    #[test]
    fn artifacts_round_trip_and_tampering_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("s")).unwrap();
        let dir = store.tmp_path("ckpt");
        sample(&dir);
        let reference = tmp.path().join("ref");
        sample(&reference);
        let (digest, bytes, files) = store.put_snapshot_dir(&dir).unwrap();
        assert!(!dir.exists());
        assert_eq!(
            bytes,
            fs::metadata(store.artifact_path(&digest)).unwrap().len()
        );
        assert_eq!(files, 100_000 + 2 + 5);
        let image = Digest::sha256_of(b"image");
        let m = manifest(&store, "app", digest.clone(), image.clone());
        store.put_snapshot(&m).unwrap();
        assert_eq!(store.snapshot("app").unwrap(), m);
        assert_eq!(store.snapshots().unwrap().len(), 1);

        // The copy made at capture is used as it is.
        let (u, fresh) = store.unpack_snapshot(&m).unwrap();
        assert!(!fresh);
        same_tree(&reference, &u);
        // Without it, the blob is unpacked and verified.
        remove_any(&u).unwrap();
        let (u, fresh) = store.unpack_snapshot(&m).unwrap();
        assert!(fresh);
        same_tree(&reference, &u);

        // One flipped byte: refused, and the old copy is not used either.
        let blob = store.artifact_path(&digest);
        let mut b = fs::read(&blob).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        fs::write(&blob, &b).unwrap();
        match store.unpack_snapshot(&m) {
            Err(SnapshotError::DigestMismatch { digest: d, .. }) => assert_eq!(d, digest),
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        assert!(!store.unpacked_path(&digest).exists());
        let problems = store.verify_snapshots(false).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        // Truncated: refused too.
        fs::write(&blob, &b[..mid]).unwrap();
        assert!(matches!(
            store.unpack_snapshot(&m),
            Err(SnapshotError::DigestMismatch { .. })
        ));
        store.verify_snapshots(true).unwrap();
        assert!(matches!(
            store.snapshot("app"),
            Err(SnapshotError::Unknown(_))
        ));
        assert!(!blob.exists());
    }

    #[test]
    fn gc_removes_snapshots_of_gone_images_and_unreferenced_artifacts() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("s")).unwrap();
        let mut digests = Vec::new();
        for i in 0..2u8 {
            let dir = store.tmp_path("ckpt");
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("f"), [i]).unwrap();
            digests.push(store.put_snapshot_dir(&dir).unwrap().0);
        }
        let (kept_image, gone_image) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        store
            .put_snapshot(&manifest(
                &store,
                "keep",
                digests[0].clone(),
                kept_image.clone(),
            ))
            .unwrap();
        store
            .put_snapshot(&manifest(&store, "gone", digests[1].clone(), gone_image))
            .unwrap();
        let r = store
            .gc_snapshots(&BTreeSet::from([kept_image.clone()]))
            .unwrap();
        assert_eq!(r.removed_snapshots, ["gone"]);
        assert_eq!((r.removed_artifacts, r.removed_unpacked), (1, 1));
        assert!(store.artifact_path(&digests[0]).exists());
        assert!(!store.artifact_path(&digests[1]).exists());
        assert!(!store.unpacked_path(&digests[1]).exists());
        // Removing the last snapshot naming an artifact frees it.
        store.remove_snapshot("keep").unwrap();
        assert!(!store.artifact_path(&digests[0]).exists());
        assert!(store.snapshots().unwrap().is_empty());
        assert!(matches!(
            store.remove_snapshot("keep"),
            Err(SnapshotError::Unknown(_))
        ));
    }

    #[test]
    fn imports_are_verified_and_leave_nothing_when_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Store::open(tmp.path().join("a")).unwrap();
        let b = Store::open(tmp.path().join("b")).unwrap();
        let dir = a.tmp_path("ckpt");
        fs::create_dir_all(dir.join("criu")).unwrap();
        fs::write(dir.join("criu/pages-1.img"), vec![3u8; 50_000]).unwrap();
        let (digest, bytes, _) = a.put_snapshot_dir(&dir).unwrap();
        let mut m = manifest(&a, "app", digest.clone(), Digest::sha256_of(b"img"));
        m.artifact_bytes = bytes;
        let good = fs::read(a.artifact_path(&digest)).unwrap();
        let tmp_entries = |s: &Store| {
            fs::read_dir(s.root().join("tmp"))
                .unwrap()
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().ends_with("-lock"))
                .count()
        };

        // Truncated, corrupt, broken off: refused, nothing left.
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 1;
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("connection reset"));
                }
                let n = self.0.min(buf.len());
                buf[..n].fill(0);
                self.0 -= n;
                Ok(n)
            }
        }
        let r = b.import_snapshot(&m, &good[..good.len() - 10]);
        assert!(
            matches!(r, Err(SnapshotError::Malformed { .. })),
            "truncated: {r:?}"
        );
        let r = b.import_snapshot(&m, flipped.as_slice());
        assert!(
            matches!(r, Err(SnapshotError::DigestMismatch { .. })),
            "flipped: {r:?}"
        );
        let r = b.import_snapshot(&m, Broken(1000));
        assert!(matches!(r, Err(SnapshotError::Io { .. })), "broken: {r:?}");
        assert!(b.snapshots().unwrap().is_empty());
        assert!(!b.artifact_path(&digest).exists());
        assert_eq!(tmp_entries(&b), 0);

        // The real bytes: a snapshot that unpacks to the same tree.
        assert_eq!(b.import_snapshot(&m, good.as_slice()).unwrap(), bytes);
        assert_eq!(b.snapshot("app").unwrap(), m);
        let (u, fresh) = b.unpack_snapshot(&m).unwrap();
        assert!(fresh);
        assert_eq!(
            fs::read(u.join("criu/pages-1.img")).unwrap(),
            vec![3u8; 50_000]
        );
        assert_eq!(tmp_entries(&b), 0);
    }

    #[test]
    fn names_are_file_names() {
        for ok in ["app", "py-3.12_warm", "A1"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
