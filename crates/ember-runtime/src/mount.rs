//! Overlayfs root filesystems.
//!
//! A container directory holds everything one container writes:
//!
//! ```text
//! <container>/rootfs   the overlay mount point (the OCI bundle's root)
//! <container>/upper    overlay upperdir: the container's writes
//! <container>/work     overlay workdir
//! <container>/l/       only for very many layers: short symlinks to them
//! ```
//!
//! Layers are given lowest first, as an image manifest lists them, and are
//! stacked top first as overlayfs wants. They are already in overlayfs's own
//! whiteout format (character device 0:0, `trusted.overlay.opaque=y`), so
//! nothing is converted.
//!
//! # The one-page limit on mount options
//!
//! `mount(2)` copies its option string into a single page (4096 bytes, NUL
//! included). Ember mounts with absolute paths whenever they fit, which is a
//! single system call. When they do not, it creates `<container>/l/<n>`
//! symlinks (`n` = position in the overlay stack, top first) and mounts with
//! `lowerdir=0:1:2:…,upperdir=../upper,workdir=../work` from a helper thread
//! that first calls `unshare(CLONE_FS)` and then `chdir`s into `l/`. The
//! unshare gives that thread its own working directory, so the process's other
//! threads never see the `chdir` (the same trick as containerd's
//! `mountAt`); overlayfs resolves every path at mount time, so the helper's
//! directory does not matter afterwards. With at most four characters per
//! layer this reaches overlayfs's own limit of [`MAX_LAYERS`] on any kernel
//! with overlayfs, unlike the `lowerdir+` option of the new mount API, which
//! needs Linux 6.8.
//!
//! # Options
//!
//! `index=off` (explicit, whatever the kernel's default) and, where the
//! kernel has it (5.10+), `volatile`: see `mount_overlay` for why.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Largest number of lower layers overlayfs stacks (the kernel's
/// `OVL_MAX_STACK`).
pub const MAX_LAYERS: usize = 500;

/// Longest option string `mount(2)` accepts: one page, less the NUL.
const MOUNT_DATA_MAX: usize = 4095;

/// Name of the overlay mount point inside a container directory.
pub const ROOTFS_DIR: &str = "rootfs";
/// Name of the overlay upper directory inside a container directory.
pub const UPPER_DIR: &str = "upper";
/// Name of the overlay work directory inside a container directory.
pub const WORK_DIR: &str = "work";
/// Name of the directory of short layer symlinks (many-layer mounts only).
const LINKS_DIR: &str = "l";
/// An empty lower layer for images without layers: overlayfs needs one.
const EMPTY_DIR: &str = "empty";

/// Errors from mounting and unmounting root filesystems.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A directory of the container could not be created.
    #[error("cannot create {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A layer symlink could not be created.
    #[error("cannot link {link} to layer {layer}")]
    Link {
        /// The symlink.
        link: PathBuf,
        /// The layer it was to point to.
        layer: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The current directory, needed to make relative paths absolute, is
    /// unreadable.
    #[error("cannot make {path} absolute")]
    Absolute {
        /// The relative path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A path contains a character that overlayfs options cannot carry.
    #[error("path {path} contains ',' or a newline, which overlayfs mount options cannot carry")]
    UnsupportedPath {
        /// The path.
        path: PathBuf,
    },
    /// More layers than overlayfs can stack.
    #[error("{count} layers exceed overlayfs's limit of {MAX_LAYERS}")]
    TooManyLayers {
        /// How many layers were given.
        count: usize,
    },
    /// `mount(2)` failed.
    #[error("cannot mount overlay at {target} ({layers} layers)")]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// How many lower layers were stacked.
        layers: usize,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The helper thread that mounts with relative paths died.
    #[error("overlay mount helper thread for {target} panicked")]
    HelperPanicked {
        /// The mount point.
        target: PathBuf,
    },
    /// `umount2(2)` failed, lazily too.
    #[error("cannot unmount {target}")]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// Why.
        #[source]
        source: Errno,
    },
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] io::Error),
}

/// A container's overlayfs root filesystem, mounted at `<container>/rootfs`.
///
/// Dropping a mounted `RootFs` unmounts it (errors are logged), so an error
/// path never leaks a mount; call [`RootFs::unmount`] to see errors.
#[derive(Debug)]
pub struct RootFs {
    container_dir: PathBuf,
    rootfs: PathBuf,
    layers: usize,
    mounted: bool,
}

impl RootFs {
    /// Mounts `layers` (lowest first, as in an image manifest) as an overlay
    /// at `<container_dir>/rootfs`, creating `container_dir`, `upper`, `work`
    /// and `rootfs` as needed.
    ///
    /// No layers at all is allowed (an empty root filesystem).
    pub fn mount<P: AsRef<Path>>(
        container_dir: impl AsRef<Path>,
        layers: &[P],
    ) -> Result<RootFs, MountError> {
        if layers.len() > MAX_LAYERS {
            return Err(MountError::TooManyLayers {
                count: layers.len(),
            });
        }
        let dir = absolute(container_dir.as_ref())?;
        let rootfs = dir.join(ROOTFS_DIR);
        let upper = dir.join(UPPER_DIR);
        let work = dir.join(WORK_DIR);
        for d in [&rootfs, &upper, &work] {
            fs::create_dir_all(d).map_err(|source| MountError::CreateDir {
                path: d.clone(),
                source,
            })?;
        }

        // Overlay order: the top layer first.
        let mut lowers: Vec<PathBuf> = Vec::with_capacity(layers.len().max(1));
        for layer in layers.iter().rev() {
            lowers.push(absolute(layer.as_ref())?);
        }
        if lowers.is_empty() {
            // Overlayfs needs at least one lower directory.
            let empty = dir.join(EMPTY_DIR);
            fs::create_dir_all(&empty).map_err(|source| MountError::CreateDir {
                path: empty.clone(),
                source,
            })?;
            lowers.push(empty);
        }
        for p in lowers.iter().chain([&upper, &work]) {
            check_path(p)?;
        }

        let data = overlay_options(lowers.iter().map(|p| p.as_path()), &upper, &work);
        // Leave room for the `volatile` option that mount_overlay may add.
        let result = if data.len() + VOLATILE_OPT.len() <= MOUNT_DATA_MAX {
            mount_overlay(&rootfs, &data)
        } else {
            mount_via_links(&dir, &rootfs, &lowers)?
        };
        result.map_err(|source| MountError::Mount {
            target: rootfs.clone(),
            layers: lowers.len(),
            source,
        })?;
        tracing::debug!(target = %rootfs.display(), layers = lowers.len(), "mounted overlay");
        Ok(RootFs {
            container_dir: dir,
            rootfs,
            layers: lowers.len(),
            mounted: true,
        })
    }

    /// The mount point, `<container>/rootfs`.
    pub fn path(&self) -> &Path {
        &self.rootfs
    }

    /// The container directory (absolute).
    pub fn container_dir(&self) -> &Path {
        &self.container_dir
    }

    /// How many lower directories the overlay stacks.
    pub fn layer_count(&self) -> usize {
        self.layers
    }

    /// Whether this value still owns a mount.
    pub fn is_mounted(&self) -> bool {
        self.mounted
    }

    /// Unmounts the root filesystem; lazily (detached) if it is busy.
    /// Calling it again, or on a rootfs someone else unmounted, is a no-op.
    pub fn unmount(&mut self) -> Result<(), MountError> {
        if self.mounted {
            unmount(&self.rootfs)?;
            self.mounted = false;
        }
        Ok(())
    }
}

impl Drop for RootFs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(error = %ember_error::chain(&e), "leaving overlay mounted");
        }
    }
}

/// Unmounts whatever is mounted at `target`, detaching lazily if it is busy.
///
/// Idempotent: a path that is not a mount point (or does not exist) is
/// success. Mounts stacked on the same point are all removed.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    // A handful of rounds covers mounts stacked by accident; a mount point
    // that stays mounted after that is reported rather than looped on.
    for _ in 0..8 {
        match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue,
            // Not (or no longer) a mount point: done.
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) => {
                tracing::debug!(target = %target.display(), "busy, detaching");
                nix::mount::umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
                    .map_err(|source| MountError::Unmount {
                        target: target.to_path_buf(),
                        source,
                    })?;
            }
            Err(source) => {
                return Err(MountError::Unmount {
                    target: target.to_path_buf(),
                    source,
                });
            }
        }
    }
    Err(MountError::Unmount {
        target: target.to_path_buf(),
        source: Errno::EBUSY,
    })
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted, octal escapes decoded.
    pub mount_point: PathBuf,
    /// The filesystem type (`overlay`, `proc`, …).
    pub fs_type: String,
    /// The mount source as the kernel reports it.
    pub source: String,
    /// The filesystem's own options (the last field: `rw,freezer` for a
    /// cgroup v1 hierarchy), comma-separated.
    pub super_options: String,
}

/// Parses the text of `/proc/<pid>/mountinfo`. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional…] - type source super-options
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let mut rest = fields.skip_while(|f| *f != "-");
            rest.next()?;
            let fs_type = rest.next()?;
            let source = rest.next().unwrap_or("");
            let super_options = rest.next().unwrap_or("");
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                fs_type: fs_type.to_owned(),
                source: unescape_octal(source),
                super_options: super_options.to_owned(),
            })
        })
        .collect()
}

/// The current mount table of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>, MountError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
    Ok(parse_mountinfo(&text))
}

/// Mount points strictly below `dir` (which is canonicalized first), deepest
/// first so they can be unmounted in order.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, MountError> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut found: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p != &dir && p.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

fn unescape_octal(s: &str) -> String {
    // The kernel escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn absolute(p: &Path) -> Result<PathBuf, MountError> {
    std::path::absolute(p).map_err(|source| MountError::Absolute {
        path: p.to_path_buf(),
        source,
    })
}

fn check_path(p: &Path) -> Result<(), MountError> {
    // ',' separates mount options and has no escape.
    if p.as_os_str()
        .as_bytes()
        .iter()
        .any(|&c| c == b',' || c == b'\n')
    {
        return Err(MountError::UnsupportedPath {
            path: p.to_path_buf(),
        });
    }
    Ok(())
}

/// Escapes what overlayfs would otherwise split a lowerdir list on.
fn push_escaped(out: &mut String, p: &Path) {
    for c in p.to_string_lossy().chars() {
        if c == ':' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
}

fn overlay_options<'a>(
    lowers: impl Iterator<Item = &'a Path>,
    upper: &Path,
    work: &Path,
) -> String {
    let mut data = String::with_capacity(256);
    data.push_str("lowerdir=");
    for (i, p) in lowers.enumerate() {
        if i > 0 {
            data.push(':');
        }
        push_escaped(&mut data, p);
    }
    data.push_str(",upperdir=");
    push_escaped(&mut data, upper);
    data.push_str(",workdir=");
    push_escaped(&mut data, work);
    // Explicit, so a kernel built with index=on by default behaves the same:
    // the inodes index would tie each lower layer to one upper.
    data.push_str(",index=off");
    data
}

/// Whether the kernel accepted `volatile` (Linux ≥ 5.10): 0 unknown, 1 yes,
/// 2 no.
static VOLATILE: AtomicU8 = AtomicU8::new(0);
const VOLATILE_OPT: &str = ",volatile";

/// Mounts with `volatile` where the kernel has it. Without it, unmounting
/// an overlay syncs the whole upper filesystem (`ovl_sync_fs`), which costs
/// milliseconds on a busy disk; a container's upper directory is discarded
/// at cleanup, so there is nothing to keep durable. (A volatile overlay
/// cannot be mounted again after a crash, and Ember never does: recovery
/// deletes it.)
fn mount_overlay(target: &Path, data: &str) -> Result<(), Errno> {
    let mount = |data: &str| {
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data),
        )
    };
    if VOLATILE.load(Ordering::Relaxed) != 2 {
        match mount(&format!("{data}{VOLATILE_OPT}")) {
            Ok(()) => {
                VOLATILE.store(1, Ordering::Relaxed);
                return Ok(());
            }
            // An old kernel rejects the option; anything else is a real
            // error that the plain mount below reports again.
            Err(Errno::EINVAL) if VOLATILE.load(Ordering::Relaxed) == 0 => {
                tracing::debug!("overlayfs has no volatile option; mounting without");
                VOLATILE.store(2, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    mount(data)
}

/// The many-layer path: see the module documentation.
fn mount_via_links(
    dir: &Path,
    rootfs: &Path,
    lowers: &[PathBuf],
) -> Result<Result<(), Errno>, MountError> {
    let links = dir.join(LINKS_DIR);
    // Stale links from an earlier attempt would point at other layers.
    let _ = fs::remove_dir_all(&links);
    fs::create_dir_all(&links).map_err(|source| MountError::CreateDir {
        path: links.clone(),
        source,
    })?;
    for (i, layer) in lowers.iter().enumerate() {
        let link = links.join(i.to_string());
        std::os::unix::fs::symlink(layer, &link).map_err(|source| MountError::Link {
            link,
            layer: layer.clone(),
            source,
        })?;
    }
    let names: Vec<PathBuf> = (0..lowers.len())
        .map(|i| PathBuf::from(i.to_string()))
        .collect();
    let data = overlay_options(
        names.iter().map(|p| p.as_path()),
        Path::new("../upper"),
        Path::new("../work"),
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            // Only this short-lived thread changes directory: CLONE_FS gives
            // it a private cwd first.
            nix::sched::unshare(CloneFlags::CLONE_FS)?;
            nix::unistd::chdir(&links)?;
            mount_overlay(rootfs, &data)
        })
        .join()
    })
    .map_err(|_| MountError::HelperPanicked {
        target: rootfs.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 shared:2 - overlay overlay rw,lowerdir=x\n\
                    22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fs_type, "overlay");
        assert_eq!(m[1].mount_point, PathBuf::from("/proc"));
        assert_eq!(m[1].source, "proc");
    }

    #[test]
    fn options_put_the_top_layer_first_and_escape_colons() {
        let lowers = [Path::new("/l/top"), Path::new("/l/a:b")];
        let o = overlay_options(
            lowers.into_iter(),
            Path::new("/c/upper"),
            Path::new("/c/work"),
        );
        assert_eq!(
            o,
            "lowerdir=/l/top:/l/a\\:b,upperdir=/c/upper,workdir=/c/work,index=off"
        );
    }

    #[test]
    fn rejects_commas() {
        assert!(check_path(Path::new("/a,b")).is_err());
        assert!(check_path(Path::new("/a:b")).is_ok());
    }
}
