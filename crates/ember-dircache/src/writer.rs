//! Writing a restored tree: one thread walks the manifest in order,
//! creates directories and symlinks itself and cuts the verified data
//! stream into per-file jobs; a few writer threads create, fill and stamp
//! the files in parallel. A restore writes tens of thousands of small
//! files, and creating each one is kernel work of its own (an inode, a
//! directory entry, page-cache pages): one thread doing all of it is what
//! `tar -x` does, and it was the serial part left once decompression and
//! hashing ran on every core.
//!
//! Order still holds where it matters: a directory is created before any
//! job for a file inside it is queued (the manifest lists parents first);
//! hardlinks are made after every file is written; directory modes and
//! mtimes are set last, deepest first.

use crate::error::DircacheError;
use crate::manifest::{Manifest, Node, NodeKind};
use crate::progress::Progress;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A decoded, verified chunk. When the last file that uses it is written
/// its buffer goes back to the decoder that filled it, which reuses the
/// allocation (its pages already mapped) instead of faulting in a new one.
pub(crate) struct Chunk {
    buf: Vec<u8>,
    home: Option<Sender<Vec<u8>>>,
}

impl Chunk {
    /// Wraps `buf`, to be handed back on `home` when dropped.
    pub(crate) fn new(buf: Vec<u8>, home: Sender<Vec<u8>>) -> Self {
        Chunk {
            buf,
            home: Some(home),
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // The decoder may be gone (end of stream); the buffer is freed.
            let _ = home.send(std::mem::take(&mut self.buf));
        }
    }
}

/// A chunk decoded (or the reason it could not be), for the writer.
pub(crate) type Decoded = Result<Chunk, DircacheError>;

/// The data stream in order: chunk `i` comes from decoder `i % D`.
pub(crate) struct ChunkSource {
    from: Vec<Receiver<Decoded>>,
    next: usize,
}

impl ChunkSource {
    /// Reads the stream from these decoders, chunk 0 from the first.
    pub(crate) fn new(from: Vec<Receiver<Decoded>>) -> Self {
        ChunkSource { from, next: 0 }
    }

    /// The next chunk; `Ok(None)` at the end of the stream.
    fn next_chunk(&mut self) -> Result<Option<Arc<Chunk>>, DircacheError> {
        let w = self.next % self.from.len();
        match self.from[w].recv() {
            Ok(Ok(c)) => {
                self.next += 1;
                Ok(Some(Arc::new(c)))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(None),
        }
    }
}

/// One file to write: its node and where its bytes are.
struct FileJob {
    node: usize,
    pieces: Vec<(Arc<Chunk>, Range<usize>)>,
}

/// Files per job and bytes per job, at most: enough that the queue costs
/// little per small file, small enough that the writers share the work.
const JOB_FILES: usize = 32;
const JOB_BYTES: usize = 1 << 20;
/// Jobs queued per writer: bounds the chunks held in memory.
const QUEUE_PER_WRITER: usize = 4;

/// What the writers share: the first error, and a flag that stops the walk.
#[derive(Default)]
struct Failure {
    failed: AtomicBool,
    first: Mutex<Option<DircacheError>>,
}

impl Failure {
    fn set(&self, e: DircacheError) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(e);
        }
        self.failed.store(true, Ordering::Release);
    }
    fn take(&self) -> Option<DircacheError> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// How files are written: the same for every writer.
struct FileRules {
    same_owner: bool,
    me: (u32, u32),
    umask: u32,
}

/// Writes every node of `m` under `dir` (an empty directory we created),
/// file data taken in order from `src`, with `writers` threads writing
/// files; then hardlinks, then directory and symlink metadata, deepest
/// first. Returns (nodes, bytes). Blocking.
pub(crate) fn write_tree(
    m: &Manifest,
    dir: &Path,
    src: &mut ChunkSource,
    same_owner: bool,
    progress: &Progress,
    writers: usize,
) -> Result<(u64, u64), DircacheError> {
    let rules = FileRules {
        same_owner,
        // What new files get anyway: chown is skipped for nodes that
        // already match (most of a tree saved and restored by one user).
        me: (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        ),
        // Files are created with their final permission bits when the
        // umask lets them through unchanged, which saves tar's fchmod.
        umask: process_umask(),
    };
    let writers = writers.max(1);
    let failure = Failure::default();
    let (jobs_tx, jobs_rx) =
        std::sync::mpsc::sync_channel::<Vec<FileJob>>(writers * QUEUE_PER_WRITER);
    let jobs_rx = Mutex::new(jobs_rx);
    let walked = std::thread::scope(|s| {
        for _ in 0..writers {
            std::thread::Builder::new()
                .name("dircache-write".into())
                .spawn_scoped(s, || {
                    write_files(m, dir, &jobs_rx, &rules, &failure, progress)
                })
                .map_err(|e| DircacheError::io("starting a writer thread", e))?;
        }
        // Moved in: the writers stop when the walk drops it, on every path.
        walk(m, dir, src, jobs_tx, &failure)
    });
    // A writer's error is the cause when the walk stopped for it.
    if let Some(e) = failure.take() {
        return Err(e);
    }
    let (bytes, hardlinks) = walked?;
    for i in hardlinks {
        let n = &m.nodes[i];
        if let NodeKind::Hardlink { target } = &n.kind {
            let p = dir.join(&n.path);
            fs::hard_link(dir.join(target), &p).map_err(|e| io("linking", &p, e))?;
        }
    }
    // Metadata after content: a read-only directory would refuse its
    // children, and creating a file bumps its parent's mtime.
    for n in m.nodes.iter().rev() {
        let p = dir.join(&n.path);
        match n.kind {
            NodeKind::Hardlink { .. } | NodeKind::File { .. } => continue,
            NodeKind::Symlink { .. } => {
                if rules.same_owner && (n.uid, n.gid) != rules.me {
                    std::os::unix::fs::lchown(&p, Some(n.uid), Some(n.gid))
                        .map_err(|e| io("chown", &p, e))?;
                }
            }
            NodeKind::Dir => {
                if rules.same_owner && (n.uid, n.gid) != rules.me {
                    std::os::unix::fs::lchown(&p, Some(n.uid), Some(n.gid))
                        .map_err(|e| io("chown", &p, e))?;
                }
                fs::set_permissions(&p, fs::Permissions::from_mode(n.mode & 0o1777))
                    .map_err(|e| io("chmod", &p, e))?;
            }
        }
        let t = nix::sys::time::TimeSpec::new(n.mtime, i64::from(n.mtime_nsec));
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &p,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io("setting the mtime of", &p, std::io::Error::from(e)))?;
    }
    Ok((m.nodes.len() as u64, bytes))
}

/// The walk: directories and symlinks made here, files cut from the
/// stream and queued in batches, hardlinks collected for later. Returns
/// (file bytes, hardlink node indexes). Stops early when a writer failed.
fn walk(
    m: &Manifest,
    dir: &Path,
    src: &mut ChunkSource,
    jobs: SyncSender<Vec<FileJob>>,
    failure: &Failure,
) -> Result<(u64, Vec<usize>), DircacheError> {
    let mut cur: Option<Arc<Chunk>> = None;
    let mut pos = 0usize;
    let mut bytes = 0u64;
    let mut batch: Vec<FileJob> = Vec::with_capacity(JOB_FILES);
    let mut batch_bytes = 0usize;
    let mut hardlinks = Vec::new();
    let stopped = || failure.failed.load(Ordering::Acquire);
    for (i, n) in m.nodes.iter().enumerate() {
        match &n.kind {
            NodeKind::Dir => {
                if stopped() {
                    return Ok((bytes, hardlinks));
                }
                let p = dir.join(&n.path);
                fs::create_dir(&p).map_err(|e| io("creating", &p, e))?;
            }
            NodeKind::File { size, .. } => {
                let mut pieces = Vec::new();
                let mut left = *size;
                while left > 0 {
                    let len = cur.as_ref().map_or(0, |c| c.buf.len());
                    if pos == len {
                        let Some(c) = src.next_chunk()? else {
                            return Err(DircacheError::InvalidManifest(
                                "the data stream ended early".into(),
                            ));
                        };
                        cur = Some(c);
                        pos = 0;
                        continue;
                    }
                    let take = (len - pos).min(usize::try_from(left).unwrap_or(usize::MAX));
                    if let Some(c) = &cur {
                        pieces.push((c.clone(), pos..pos + take));
                    }
                    pos += take;
                    left -= take as u64;
                }
                bytes += *size;
                batch_bytes += usize::try_from(*size).unwrap_or(usize::MAX);
                batch.push(FileJob { node: i, pieces });
                if batch.len() >= JOB_FILES || batch_bytes >= JOB_BYTES {
                    if stopped() {
                        return Ok((bytes, hardlinks));
                    }
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(JOB_FILES));
                    batch_bytes = 0;
                    if jobs.send(full).is_err() {
                        return Ok((bytes, hardlinks)); // every writer is gone: it failed
                    }
                }
            }
            NodeKind::Symlink { target } => {
                let p = dir.join(&n.path);
                std::os::unix::fs::symlink(target, &p).map_err(|e| io("creating", &p, e))?
            }
            NodeKind::Hardlink { .. } => hardlinks.push(i),
        }
    }
    if !batch.is_empty() && jobs.send(batch).is_err() {
        return Ok((bytes, hardlinks));
    }
    let len = cur.as_ref().map_or(0, |c| c.buf.len());
    if pos != len || src.next_chunk()?.is_some() {
        return Err(DircacheError::InvalidManifest(
            "the data stream is longer than the files".into(),
        ));
    }
    Ok((bytes, hardlinks))
}

/// A writer thread: takes batches until the walk ends; after a failure it
/// only drains the queue, so the walk never blocks on a full one.
fn write_files(
    m: &Manifest,
    dir: &Path,
    jobs: &Mutex<Receiver<Vec<FileJob>>>,
    rules: &FileRules,
    failure: &Failure,
    progress: &Progress,
) {
    loop {
        // The lock is held only while waiting for the next batch.
        let next = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(batch) = next else { return };
        for job in batch {
            if failure.failed.load(Ordering::Acquire) {
                break;
            }
            let n = &m.nodes[job.node];
            if let Err(e) = write_file(n, &dir.join(&n.path), &job.pieces, rules) {
                failure.set(e);
                break;
            }
            if let NodeKind::File { size, .. } = n.kind {
                progress.bytes_done.fetch_add(size, Ordering::Relaxed);
            }
        }
    }
}

/// Creates one file with its bytes, owner, mode and mtime.
fn write_file(
    n: &Node,
    p: &Path,
    pieces: &[(Arc<Chunk>, Range<usize>)],
    rules: &FileRules,
) -> Result<(), DircacheError> {
    // setuid/setgid are not restored from a cache: an entry is outside
    // input and must not hand out privileges.
    let mode = n.mode & 0o1777;
    let create = mode & 0o777;
    // create_new + O_NOFOLLOW: never through or over anything. The
    // creating descriptor may write even when the mode is read-only.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .mode(create)
        .open(p)
        .map_err(|e| io("creating", p, e))?;
    for (c, r) in pieces {
        f.write_all(&c.buf[r.clone()])
            .map_err(|e| io("writing", p, e))?;
    }
    // Metadata through the open descriptor: no second path walk.
    if rules.same_owner && (n.uid, n.gid) != rules.me {
        std::os::unix::fs::fchown(&f, Some(n.uid), Some(n.gid)).map_err(|e| io("chown", p, e))?;
    }
    // fchown clears setuid-like bits only; the sticky bit or a
    // umask-masked bit still needs the chmod.
    if mode != create & !rules.umask || mode & 0o1000 != 0 {
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io("chmod", p, e))?;
    }
    f.set_modified(mtime(n))
        .map_err(|e| io("setting the mtime of", p, e))
}

fn io(what: &str, p: &Path, e: std::io::Error) -> DircacheError {
    DircacheError::io(format!("{what} {}", p.display()), e)
}

fn mtime(n: &Node) -> std::time::SystemTime {
    let d = Duration::new(n.mtime.unsigned_abs(), n.mtime_nsec.min(999_999_999));
    if n.mtime >= 0 {
        std::time::UNIX_EPOCH + d
    } else {
        std::time::UNIX_EPOCH - d
    }
}

/// The process's umask, read from /proc (reading it with umask(2) would
/// change it for every thread for a moment). Unreadable counts as "masks
/// everything", so every file then gets its chmod.
fn process_umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o777)
}
