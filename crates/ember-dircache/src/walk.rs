//! Reading a directory tree into manifest nodes, and the data stream of
//! its files' contents.

use crate::error::DircacheError;
use crate::manifest::{Node, NodeKind};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A scanned tree: nodes in manifest order (parents first, names sorted
/// so that two saves of similar trees produce similar streams) and the
/// regular files whose bytes make up the data stream, in the same order.
#[derive(Debug, Default)]
pub struct Scan {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// (absolute path, size) of each regular file, in stream order.
    pub files: Vec<(PathBuf, u64)>,
    /// Sockets, FIFOs and device nodes left out.
    pub skipped: Vec<PathBuf>,
}

/// Scans `root` (not following symlinks). Blocking.
pub fn scan(root: &Path) -> Result<Scan, DircacheError> {
    let md = fs::metadata(root)
        .map_err(|e| DircacheError::io(format!("reading {}", root.display()), e))?;
    if !md.is_dir() {
        return Err(DircacheError::Unsupported {
            path: root.to_path_buf(),
            detail: "not a directory".into(),
        });
    }
    let mut out = Scan::default();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    let mut offset = 0u64;
    walk(root, "", &mut out, &mut inodes, &mut offset)?;
    Ok(out)
}

fn walk(
    dir: &Path,
    prefix: &str,
    out: &mut Scan,
    inodes: &mut HashMap<(u64, u64), String>,
    offset: &mut u64,
) -> Result<(), DircacheError> {
    let io = |what: &str, p: &Path, e| DircacheError::io(format!("{what} {}", p.display()), e);
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| io("reading", dir, e))? {
        let e = e.map_err(|e| io("reading", dir, e))?;
        names.push(e.file_name());
    }
    names.sort();
    for name in names {
        let full = dir.join(&name);
        let name = name.into_string().map_err(|_| DircacheError::Unsupported {
            path: full.clone(),
            detail: "name is not UTF-8".into(),
        })?;
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let md = fs::symlink_metadata(&full).map_err(|e| io("reading", &full, e))?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            NodeKind::Dir
        } else if ft.is_symlink() {
            let t = fs::read_link(&full).map_err(|e| io("reading", &full, e))?;
            let target =
                t.into_os_string()
                    .into_string()
                    .map_err(|_| DircacheError::Unsupported {
                        path: full.clone(),
                        detail: "symlink target is not UTF-8".into(),
                    })?;
            NodeKind::Symlink { target }
        } else if ft.is_file() {
            let id = (md.dev(), md.ino());
            match inodes.get(&id) {
                Some(first) if md.nlink() > 1 => NodeKind::Hardlink {
                    target: first.clone(),
                },
                _ => {
                    if md.nlink() > 1 {
                        inodes.insert(id, rel.clone());
                    }
                    let size = md.len();
                    out.files.push((full.clone(), size));
                    let k = NodeKind::File {
                        offset: *offset,
                        size,
                    };
                    *offset += size;
                    k
                }
            }
        } else {
            // Sockets, FIFOs and devices are not cache content.
            debug_assert!(
                ft.is_socket() || ft.is_fifo() || ft.is_block_device() || ft.is_char_device()
            );
            out.skipped.push(full);
            continue;
        };
        let is_dir = matches!(kind, NodeKind::Dir);
        out.nodes.push(Node {
            path: rel.clone(),
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
        });
        if is_dir {
            walk(&full, &rel, out, inodes, offset)?;
        }
    }
    Ok(())
}

/// Reads the files of a [`Scan`] as one stream, each exactly as long as it
/// was when scanned; a file that shrank or grew since is an error (left in
/// `failure`, since `Read` can only return `io::Error`).
pub struct DataStream {
    files: std::vec::IntoIter<(PathBuf, u64)>,
    current: Option<(PathBuf, File, u64)>,
    /// The first failure, with the path it concerns.
    pub failure: Arc<Mutex<Option<DircacheError>>>,
}

impl DataStream {
    /// A stream over `files`.
    pub fn new(files: Vec<(PathBuf, u64)>) -> Self {
        DataStream {
            files: files.into_iter(),
            current: None,
            failure: Arc::default(),
        }
    }
}

fn fail(slot: &Mutex<Option<DircacheError>>, e: DircacheError) -> std::io::Error {
    let msg = ember_error::chain(&e).to_string();
    let mut f = slot.lock().unwrap_or_else(|p| p.into_inner());
    f.get_or_insert(e);
    std::io::Error::other(msg)
}

impl Read for DataStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let failure = self.failure.clone();
        loop {
            if self.current.is_none() {
                let Some((path, size)) = self.files.next() else {
                    return Ok(0);
                };
                let f = File::open(&path).map_err(|e| {
                    fail(
                        &failure,
                        DircacheError::io(format!("opening {}", path.display()), e),
                    )
                })?;
                self.current = Some((path, f, size));
            }
            let Some((path, f, left)) = self.current.as_mut() else {
                continue;
            };
            if *left == 0 {
                // Anything beyond the scanned size means it changed.
                let mut one = [0u8; 1];
                let n = f.read(&mut one).map_err(|e| {
                    let e = DircacheError::io(format!("reading {}", path.display()), e);
                    fail(&failure, e)
                })?;
                if n != 0 {
                    let e = DircacheError::Unsupported {
                        path: path.clone(),
                        detail: "file grew while it was being saved".into(),
                    };
                    return Err(fail(&failure, e));
                }
                self.current = None;
                continue;
            }
            let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            let n = f.read(&mut buf[..want]).map_err(|e| {
                let e = DircacheError::io(format!("reading {}", path.display()), e);
                fail(&failure, e)
            })?;
            if n == 0 {
                let e = DircacheError::Unsupported {
                    path: path.clone(),
                    detail: "file shrank while it was being saved".into(),
                };
                return Err(fail(&failure, e));
            }
            *left -= n as u64;
            return Ok(n);
        }
    }
}
