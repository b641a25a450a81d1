//! Safe extraction of layer tars.
//!
//! Two modes share one entry walker:
//!
//! * [`Mode::Overlay`] unpacks one layer into its own empty directory,
//!   turning OCI whiteouts into overlayfs's native format (a `0:0` character
//!   device for a deleted name, `trusted.overlay.opaque=y` on an opaque
//!   directory), so the runtime can stack layer directories with overlayfs
//!   and never copy a file.
//! * [`Mode::Flatten`] applies layers one after another onto one directory,
//!   carrying out whiteouts by deleting, as `umoci unpack` does.
//!
//! Layer tars are outside input. Every entry's path is resolved inside the
//! destination: `..` components are refused, leading `/` is stripped, no
//! existing symlink is ever followed while creating entries (each parent is
//! checked with `lstat`), hardlinks must point at a file inside the tree.
//! Nothing is written outside `dest`.
//!
//! Device nodes are created as the tar says, as containerd, podman and
//! umoci do when running as root: a container never reaches them, because
//! the runtime mounts its own tmpfs on `/dev` and the device cgroup allows
//! only the standard devices; and the store root is 0700, so no
//! unprivileged host user reaches them either. The one exception is a
//! `0:0` character device: there is no such device (major 0 is reserved),
//! and in an overlay lower directory the kernel would take it for a
//! whiteout, a deletion that is not written as one (`.wh.`), so that the
//! container and `ember image unpack` would disagree about the tree. It is
//! refused as hostile in both modes.
//!
//! In [`Mode::Overlay`] the unpack also records the finished tree (see
//! [`crate::tree`]), with each file's checksum taken from the copy buffer,
//! so the store can verify the layer later.

use crate::tree::{ContentHasher, NewDir, NewFile, RecordBuilder, TreeRecord};
use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// How a layer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Into an empty directory of its own, whiteouts in overlayfs format.
    Overlay,
    /// Onto the union of the layers below it, whiteouts applied.
    Flatten,
}

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Reading the tar stream failed (which includes a failed download or a
    /// corrupt compressed stream feeding it).
    #[error("reading layer tar")]
    Read(#[source] io::Error),
    /// The tar names a path that would leave the layer directory.
    #[error("hostile layer: entry {path:?} {why}")]
    Hostile {
        /// The path as written in the tar.
        path: String,
        /// What it tried.
        why: String,
    },
    /// Reading the tar stream failed at or after an entry.
    #[error("reading layer tar at entry {entry:?}")]
    ReadAt {
        /// The last entry read (its path as written in the tar).
        entry: String,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// A filesystem operation failed.
    #[error("unpacking {path}: {op}")]
    Io {
        /// The path being written.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What an unpack wrote.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct UnpackStats {
    /// Entries processed.
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// Device nodes created.
    pub devices: u64,
    /// The finished tree ([`Mode::Overlay`] only), for the store's record.
    #[serde(skip)]
    pub tree: Option<TreeRecord>,
}

impl UnpackError {
    /// Names the tar entry being processed: hostile-entry errors report the
    /// entry as written in the tar (not a parent or a link target), and
    /// read errors say where in the stream they happened.
    fn at_entry(self, entry: &str) -> UnpackError {
        match self {
            UnpackError::Hostile { path, why } if path != entry => UnpackError::Hostile {
                path: entry.to_string(),
                why: if path.is_empty() {
                    why
                } else {
                    format!("{why} (at {path:?})")
                },
            },
            UnpackError::Read(source) => UnpackError::ReadAt {
                entry: entry.to_string(),
                source,
            },
            other => other,
        }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError + use<'a> {
    move |source| UnpackError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Metadata applied to directories after all entries, because creating
/// children changes a directory's mtime and a read-only mode would stop us
/// creating them.
struct DirMeta {
    path: PathBuf,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
}

/// Unpacks the tar read from `reader` into `dest` (which must exist); in
/// [`Mode::Overlay`] with the tree's record in [`UnpackStats::tree`].
pub fn unpack<R: Read>(reader: R, dest: &Path, mode: Mode) -> Result<UnpackStats, UnpackError> {
    unpack_inner(reader, dest, mode, mode == Mode::Overlay)
}

/// [`unpack`] in [`Mode::Overlay`] without recording the tree: only for
/// measuring what the record costs.
pub fn unpack_unrecorded<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    unpack_inner(reader, dest, Mode::Overlay, false)
}

fn unpack_inner<R: Read>(
    reader: R,
    dest: &Path,
    mode: Mode,
    record: bool,
) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut u = Unpacker {
        dest: dest.to_path_buf(),
        mode,
        known_dirs: HashSet::new(),
        this_layer: HashSet::new(),
        dirs: Vec::new(),
        stats: UnpackStats::default(),
        buf: vec![0u8; 128 * 1024],
        record: record.then(RecordBuilder::new),
        root: nix::unistd::geteuid().is_root(),
        opaque: HashSet::new(),
    };
    let entries = archive.entries().map_err(UnpackError::Read)?;
    let mut last = String::from("(start of archive)");
    for entry in entries {
        let entry = entry.map_err(|e| UnpackError::Read(e).at_entry(&last))?;
        last = entry
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| String::from_utf8_lossy(&entry.path_bytes()).into_owned());
        u.entry(entry).map_err(|e| e.at_entry(&last))?;
    }
    // Deepest first, so a parent's mtime is set after its children's.
    u.dirs
        .sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
    for d in std::mem::take(&mut u.dirs) {
        if apply_dir_meta(&d)? {
            u.record_dir(&d);
        }
    }
    if let Some(record) = u.record.take() {
        u.stats.tree = Some(record.finish(dest).map_err(io_err(dest, "record tree"))?);
    }
    Ok(u.stats)
}

struct Unpacker {
    dest: PathBuf,
    mode: Mode,
    /// Relative directories known to be real directories (not symlinks)
    /// created or checked during this unpack; saves an lstat per component.
    known_dirs: HashSet<PathBuf>,
    /// Relative paths written by this layer (Flatten mode: an opaque
    /// directory keeps these and drops what lower layers put there).
    this_layer: HashSet<PathBuf>,
    dirs: Vec<DirMeta>,
    stats: UnpackStats,
    /// Copy buffer reused for every file (allocating one per file cost a
    /// page-faulting mmap each time).
    buf: Vec<u8>,
    /// Overlay mode: the tree record, built as entries are written.
    record: Option<RecordBuilder>,
    /// Running as root (metadata is set exactly as the tar says).
    root: bool,
    /// Directories this unpack marked opaque (the record asks the
    /// filesystem about those).
    opaque: HashSet<PathBuf>,
}

/// A tar path made relative and free of `.`/`..`; `None` for the root.
fn clean_path(raw: &Path) -> Result<Option<PathBuf>, UnpackError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(UnpackError::Hostile {
                    path: raw.display().to_string(),
                    why: "contains '..'".into(),
                });
            }
            Component::Prefix(_) => {
                return Err(UnpackError::Hostile {
                    path: raw.display().to_string(),
                    why: "has a path prefix".into(),
                });
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

impl Unpacker {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        self.stats.entries += 1;
        let raw_path = entry.path().map_err(UnpackError::Read)?.into_owned();
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let mut uid = header.uid().unwrap_or(0);
        let mut gid = header.gid().unwrap_or(0);
        let mut mtime = header.mtime().unwrap_or(0) as i64;
        let link = entry
            .link_name()
            .map_err(UnpackError::Read)?
            .map(|l| l.into_owned());
        let (dev_major, dev_minor) = (
            header.device_major().ok().flatten().unwrap_or(0),
            header.device_minor().ok().flatten().unwrap_or(0),
        );
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Read)? {
            for ext in pax {
                let ext = ext.map_err(UnpackError::Read)?;
                let Ok(key) = ext.key() else { continue };
                match key {
                    "uid" => uid = ext.value().ok().and_then(|v| v.parse().ok()).unwrap_or(uid),
                    "gid" => gid = ext.value().ok().and_then(|v| v.parse().ok()).unwrap_or(gid),
                    "mtime" => {
                        mtime = ext
                            .value()
                            .ok()
                            .and_then(|v| v.split('.').next().and_then(|s| s.parse().ok()))
                            .unwrap_or(mtime)
                    }
                    k => {
                        if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                            xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let Some(rel) = clean_path(&raw_path)? else {
            // The root directory itself: only its metadata could change.
            if kind.is_dir() && self.mode == Mode::Overlay {
                self.dirs.push(DirMeta {
                    path: self.dest.clone(),
                    mode,
                    uid,
                    gid,
                    mtime,
                });
            }
            return Ok(());
        };
        let name = rel
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let parent_rel = rel.parent().map(Path::to_path_buf).unwrap_or_default();

        // Whiteouts.
        if name == b".wh..wh..opq" {
            let dir = self.ensure_dir(&parent_rel)?;
            match self.mode {
                Mode::Overlay => {
                    set_xattr(&dir, "trusted.overlay.opaque", b"y")
                        .map_err(io_err(&dir, "mark opaque"))?;
                    self.opaque.insert(parent_rel.clone());
                    if !parent_rel.as_os_str().is_empty() {
                        self.note_later(&parent_rel);
                    }
                }
                Mode::Flatten => self.clear_lower_children(&parent_rel, &dir)?,
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(UnpackError::Hostile {
                    path: raw_path.display().to_string(),
                    why: "is a malformed whiteout".into(),
                });
            }
            let dir = self.ensure_dir(&parent_rel)?;
            let target_rel = parent_rel.join(std::ffi::OsStr::from_bytes(hidden));
            let target = dir.join(std::ffi::OsStr::from_bytes(hidden));
            self.remove_existing(&target_rel, &target)?;
            if self.mode == Mode::Overlay {
                mknod(&target, libc::S_IFCHR, 0).map_err(io_err(&target, "create whiteout"))?;
                self.note_later(&target_rel);
                self.this_layer.insert(target_rel);
            }
            return Ok(());
        }

        let parent = self.ensure_dir(&parent_rel)?;
        let path = parent.join(rel.file_name().unwrap_or_default());
        self.this_layer.insert(rel.clone());

        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove_existing(&rel, &path)?;
                        mkdir(&path)?;
                    }
                    Err(_) => mkdir(&path)?,
                }
                self.known_dirs.insert(rel.clone());
                self.note_later(&rel);
                self.dirs.push(DirMeta {
                    path,
                    mode,
                    uid,
                    gid,
                    mtime,
                });
                self.apply_xattrs(&self.dest.join(&rel), &xattrs)?;
            }
            tar::EntryType::GNUSparse => {
                // The tar crate fills a sparse file's holes with zeros up to
                // a size the header claims, not the bytes the layer carries:
                // a 1.5 KiB entry could make us write the whole disk. Image
                // builders do not produce sparse entries, so refuse them.
                return Err(UnpackError::Hostile {
                    path: raw_path.display().to_string(),
                    why: "is a GNU sparse file (not supported in image layers)".into(),
                });
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                // Create first and clear the way only if something is there:
                // most entries are new, so this saves an lstat per file.
                let open = || {
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                        .open(&path)
                };
                let mut f = match open() {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.remove_existing(&rel, &path)?;
                        open().map_err(io_err(&path, "create file"))?
                    }
                    Err(e) => return Err(io_err(&path, "create file")(e)),
                };
                // A read error is the stream's fault (download, inflate); a
                // write error the disk's (ENOSPC keeps its code).
                let mut hasher = self.record.as_ref().map(|_| ContentHasher::new());
                let n = copy_entry(&mut entry, &mut f, &mut self.buf, hasher.as_mut()).map_err(
                    |e| match e {
                        CopyError::Read(e) => UnpackError::Read(e),
                        CopyError::Write(source) => UnpackError::Io {
                            path: path.clone(),
                            op: "write",
                            source,
                        },
                    },
                )?;
                self.stats.bytes += n;
                // Metadata through the open descriptor: no path lookups.
                set_meta_fd(&f, &path, uid, gid, mode, mtime)?;
                // Setting xattrs changes ctime only, so after the mtime is fine.
                self.apply_xattrs(&path, &xattrs)?;
                if let (Some(record), Some(h)) = (&mut self.record, hasher) {
                    let xxh3 = h.finish();
                    match kept_exactly(self.root, uid, gid, mtime) {
                        Some((uid, gid)) => record.file(
                            &rel,
                            NewFile {
                                mode,
                                uid,
                                gid,
                                size: n,
                                mtime,
                                xxh3,
                            },
                        ),
                        // Ask the file at the end.
                        None => record.file_later(&rel, xxh3),
                    }
                }
            }
            tar::EntryType::Symlink => {
                let target = link.ok_or_else(|| UnpackError::Hostile {
                    path: raw_path.display().to_string(),
                    why: "is a symlink without a target".into(),
                })?;
                self.remove_existing(&rel, &path)?;
                // The target is stored verbatim: it is only ever resolved
                // inside the container's root, never by us.
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(io_err(&path, "create symlink"))?;
                self.apply_owner_mode(&path, uid, gid, mode, true)?;
                set_mtime(&path, mtime).map_err(io_err(&path, "set mtime"))?;
                self.note_later(&rel);
            }
            tar::EntryType::Link => {
                let target_raw = link.ok_or_else(|| UnpackError::Hostile {
                    path: raw_path.display().to_string(),
                    why: "is a hardlink without a target".into(),
                })?;
                let target_rel = clean_path(&target_raw)?.ok_or(UnpackError::Hostile {
                    path: raw_path.display().to_string(),
                    why: "is a hardlink to the root".into(),
                })?;
                let target_parent = self.check_dir_chain(target_rel.parent())?;
                let target = target_parent.join(target_rel.file_name().unwrap_or_default());
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.file_type().is_file() => {}
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(UnpackError::Hostile {
                            path: raw_path.display().to_string(),
                            why: "is a hardlink to a symlink".into(),
                        });
                    }
                    Ok(_) => {
                        return Err(UnpackError::Hostile {
                            path: raw_path.display().to_string(),
                            why: "is a hardlink to a directory or special file".into(),
                        });
                    }
                    Err(_) => {
                        return Err(UnpackError::Hostile {
                            path: raw_path.display().to_string(),
                            why: "is a hardlink to a file that is not in the layer".into(),
                        });
                    }
                }
                if target == path {
                    return Ok(());
                }
                self.remove_existing(&rel, &path)?;
                fs::hard_link(&target, &path).map_err(io_err(&path, "create hardlink"))?;
                if let Some(record) = &mut self.record {
                    record.hardlink(&rel, &target_rel);
                }
            }
            tar::EntryType::Fifo => {
                self.remove_existing(&rel, &path)?;
                mknod(&path, libc::S_IFIFO | (mode & 0o777), 0)
                    .map_err(io_err(&path, "create fifo"))?;
                self.apply_owner_mode(&path, uid, gid, mode, false)?;
                set_mtime(&path, mtime).map_err(io_err(&path, "set mtime"))?;
                self.note_later(&rel);
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let is_char = kind == tar::EntryType::Char;
                if is_char && dev_major == 0 && dev_minor == 0 {
                    // See the module doc: a whiteout in disguise.
                    return Err(UnpackError::Hostile {
                        path: raw_path.display().to_string(),
                        why: "is a 0:0 character device, which overlayfs would take for a whiteout"
                            .into(),
                    });
                }
                self.remove_existing(&rel, &path)?;
                let kind_bits = if is_char {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                let dev = libc::makedev(dev_major, dev_minor);
                mknod(&path, kind_bits | (mode & 0o777), dev)
                    .map_err(io_err(&path, "create device node"))?;
                self.apply_owner_mode(&path, uid, gid, mode, false)?;
                set_mtime(&path, mtime).map_err(io_err(&path, "set mtime"))?;
                self.note_later(&rel);
                self.stats.devices += 1;
            }
            other => {
                tracing::debug!(path = %raw_path.display(), kind = ?other, "skipping unsupported entry type");
            }
        }
        Ok(())
    }

    /// Records a directory whose deferred metadata was just applied, from
    /// the values applied, when they are exactly what the filesystem keeps
    /// (see the regular-file case); otherwise it stays noted for `lstat`.
    fn record_dir(&mut self, d: &DirMeta) {
        let Some(record) = &mut self.record else {
            return;
        };
        let Ok(rel) = d.path.strip_prefix(&self.dest) else {
            return;
        };
        if rel.as_os_str().is_empty() || self.opaque.contains(rel) {
            return;
        }
        if let Some((uid, gid)) = kept_exactly(self.root, d.uid, d.gid, d.mtime) {
            record.dir(
                rel,
                NewDir {
                    mode: d.mode,
                    uid,
                    gid,
                    mtime: d.mtime,
                },
            );
        }
    }

    /// Notes `rel` for the tree record, to be recorded from `lstat` once
    /// the unpack is done.
    fn note_later(&mut self, rel: &Path) {
        if let Some(record) = &mut self.record {
            record.later(rel);
        }
    }

    /// Makes sure every component of `rel` is a real directory inside dest
    /// (creating missing ones), and returns its absolute path.
    fn ensure_dir(&mut self, rel: &Path) -> Result<PathBuf, UnpackError> {
        self.dir_chain(rel, true)
    }

    /// Like `ensure_dir` but never creates: for hardlink targets.
    fn check_dir_chain(&mut self, rel: Option<&Path>) -> Result<PathBuf, UnpackError> {
        self.dir_chain(rel.unwrap_or(Path::new("")), false)
    }

    /// Walks `rel` component by component with `lstat` (skipping what is
    /// already known to be a real directory), creating missing directories
    /// when `create`, and refusing symlinks and non-directories.
    fn dir_chain(&mut self, rel: &Path, create: bool) -> Result<PathBuf, UnpackError> {
        if rel.as_os_str().is_empty() || self.known_dirs.contains(rel) {
            return Ok(self.dest.join(rel));
        }
        let hostile = |why: &str| UnpackError::Hostile {
            path: rel.display().to_string(),
            why: why.into(),
        };
        let mut cur_rel = PathBuf::new();
        for c in rel.components() {
            cur_rel.push(c);
            if self.known_dirs.contains(&cur_rel) {
                continue;
            }
            let abs = self.dest.join(&cur_rel);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => {}
                _ if !create => {
                    return Err(hostile(
                        "is a hardlink whose target's directory is a symlink or missing",
                    ));
                }
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(hostile("passes through a symlink"));
                }
                Ok(_) => return Err(hostile("passes through a non-directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    mkdir(&abs)?;
                    // Implicit parents get the conventional 0755 root:root.
                    fs::set_permissions(&abs, fs::Permissions::from_mode(0o755))
                        .map_err(io_err(&abs, "chmod"))?;
                    self.note_later(&cur_rel);
                }
                Err(e) => return Err(io_err(&abs, "stat")(e)),
            }
            self.known_dirs.insert(cur_rel.clone());
        }
        Ok(self.dest.join(rel))
    }

    /// Removes whatever is at `path` before an entry replaces it. A
    /// directory stays if the new entry is a directory too (handled by the
    /// caller); otherwise the whole subtree goes.
    fn remove_existing(&mut self, rel: &Path, path: &Path) -> Result<(), UnpackError> {
        if let Some(record) = &mut self.record {
            record.removed(rel);
        }
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(path).map_err(io_err(path, "remove directory"))?;
                // Cached knowledge of directories below it is now stale, and
                // their deferred metadata must not land on what replaces them.
                self.known_dirs.retain(|d| !d.starts_with(rel));
                self.dirs.retain(|d| !d.path.starts_with(path));
            }
            Ok(_) => fs::remove_file(path).map_err(io_err(path, "remove"))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, "stat")(e)),
        }
        Ok(())
    }

    /// Flatten mode's opaque directory: drop children that lower layers put
    /// there, keep what this layer already wrote.
    fn clear_lower_children(&mut self, rel: &Path, dir: &Path) -> Result<(), UnpackError> {
        let rd = fs::read_dir(dir).map_err(io_err(dir, "read directory"))?;
        for e in rd {
            let e = e.map_err(io_err(dir, "read directory"))?;
            let child_rel = rel.join(e.file_name());
            if !self.this_layer.contains(&child_rel) {
                self.remove_existing(&child_rel, &e.path())?;
            }
        }
        Ok(())
    }

    fn apply_owner_mode(
        &self,
        path: &Path,
        uid: u64,
        gid: u64,
        mode: u32,
        is_symlink: bool,
    ) -> Result<(), UnpackError> {
        let (uid, gid) = (u32::try_from(uid).ok(), u32::try_from(gid).ok());
        std::os::unix::fs::lchown(path, uid, gid).map_err(io_err(path, "chown"))?;
        if !is_symlink {
            // After chown: chown clears setuid/setgid bits.
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(io_err(path, "chmod"))?;
        }
        Ok(())
    }

    fn apply_xattrs(&self, path: &Path, xattrs: &[(String, Vec<u8>)]) -> Result<(), UnpackError> {
        for (name, value) in xattrs {
            // trusted.* would let a layer forge overlayfs metadata (opaque
            // markers, redirects); security.* other than file capabilities
            // belongs to the host's LSM.
            let allowed = name.starts_with("user.") || name == "security.capability";
            if !allowed {
                tracing::debug!(path = %path.display(), xattr = %name, "skipping xattr");
                continue;
            }
            if let Err(e) = set_xattr(path, name, value) {
                // Filesystems without user xattrs are common; not fatal.
                tracing::warn!(path = %path.display(), xattr = %name, error = %ember_error::chain(&e), "could not set xattr");
            }
        }
        Ok(())
    }
}

/// Applies a directory's deferred owner, mode and mtime through a handle
/// opened with `O_NOFOLLOW | O_DIRECTORY`, so if anything but that very
/// directory is at the path now (a symlink a later entry put there), the
/// metadata goes nowhere instead of to the symlink's target.
/// The owner as `set_meta_fd` sets it, when the filesystem then keeps
/// owner, mode and mtime exactly as set, so the tree record can take them
/// from the tar: as root (chmod keeps setgid whatever the group), an owner
/// within 32 bits (beyond, it is left as created), and an mtime in
/// 1970..2038 (which every filesystem stores as is; ext4 clamps others).
fn kept_exactly(root: bool, uid: u64, gid: u64, mtime: i64) -> Option<(u32, u32)> {
    let owner = (u32::try_from(uid).ok()?, u32::try_from(gid).ok()?);
    (root && (0..1 << 31).contains(&mtime)).then_some(owner)
}

/// True if the metadata was applied (false: something else is there now).
fn apply_dir_meta(d: &DirMeta) -> Result<bool, UnpackError> {
    let f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(&d.path)
    {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::ENOENT)
            ) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(io_err(&d.path, "open directory")(e)),
    };
    set_meta_fd(&f, &d.path, d.uid, d.gid, d.mode, d.mtime)?;
    Ok(true)
}

/// Owner, mode and mtime through an open descriptor (`path` only names it
/// in errors).
fn set_meta_fd(
    f: &fs::File,
    path: &Path,
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: i64,
) -> Result<(), UnpackError> {
    let (uid, gid) = (u32::try_from(uid).ok(), u32::try_from(gid).ok());
    std::os::unix::fs::fchown(f, uid, gid).map_err(io_err(path, "chown"))?;
    // After chown: chown clears setuid/setgid bits.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path, "chmod"))?;
    let ts = libc::timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: a descriptor we own and a two-element timespec array, as
    // futimens requires.
    if unsafe { libc::futimens(std::os::fd::AsRawFd::as_raw_fd(f), times.as_ptr()) } != 0 {
        return Err(io_err(path, "set mtime")(io::Error::last_os_error()));
    }
    Ok(())
}

/// Which side of a copy failed.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies an entry's contents through `buf`, telling read errors (the
/// stream) from write errors (the disk), and feeds `hasher` the bytes
/// while they are in the buffer.
fn copy_entry<R: Read, W: io::Write>(
    r: &mut R,
    w: &mut W,
    buf: &mut [u8],
    mut hasher: Option<&mut ContentHasher>,
) -> Result<u64, CopyError> {
    let mut total = 0u64;
    loop {
        let n = match r.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        w.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
}

fn mkdir(path: &Path) -> Result<(), UnpackError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(path, "create directory")(e)),
    }
}

pub(crate) fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

pub(crate) fn mknod(path: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn set_mtime(path: &Path, mtime: i64) -> io::Result<()> {
    let c = cstr(path)?;
    let ts = libc::timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: valid path pointer and a two-element timespec array, as
    // utimensat requires; AT_SYMLINK_NOFOLLOW keeps it off symlink targets.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets an extended attribute on `path` itself (never a symlink target).
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cstr(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: valid NUL-terminated strings and a value slice with its length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Total bytes of regular files under `dir` (each inode counted once) and
/// the number of entries; the store's size accounting for a layer.
pub fn tree_size(dir: &Path) -> io::Result<(u64, u64)> {
    let mut seen = HashSet::new();
    let mut bytes = 0;
    let mut entries = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            entries += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && seen.insert(m.ino()) {
                bytes += m.len();
            }
        }
    }
    Ok((bytes, entries))
}
