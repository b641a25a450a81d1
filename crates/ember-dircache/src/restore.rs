//! Restoring an entry: look it up, check its manifest, fetch and verify
//! its chunks (in order, several in flight), write the tree into a fresh
//! directory beside the target, then put it in place with one rename (an
//! atomic exchange when the target exists). On any failure the fresh
//! directory is removed and the target is as it was.

use crate::client::CacheClient;
use crate::error::DircacheError;
use crate::manifest::{Manifest, NodeKind, Policy, check_name};
use crate::progress::Progress;
use crate::save::join_err;
use crate::wire::{EntryInfo, LookupRequest};
use futures_util::StreamExt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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

    // Fetch in order with `concurrency` in flight; the writer thread takes
    // them in stream order.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(opts.concurrency.max(1) * 2);
    let m = manifest.clone();
    let dir = staging.clone();
    let same_owner = opts.same_owner;
    let wprogress = opts.progress.clone();
    let writer =
        tokio::task::spawn_blocking(move || write_tree(&m, &dir, rx, same_owner, &wprogress));
    let mut fetched = 0u64;
    let mut fetch_err = None;
    {
        let mut chunks = futures_util::stream::iter(
            manifest
                .chunks
                .iter()
                .map(|c| async move { client.get_chunk(&c.digest, c.size).await }),
        )
        .buffered(opts.concurrency.max(1));
        while let Some(c) = chunks.next().await {
            match c {
                Ok(data) => {
                    fetched += 1;
                    opts.progress
                        .chunks_uploaded
                        .fetch_add(1, Ordering::Relaxed);
                    let tx = tx.clone();
                    // The channel is bounded: hand over on a blocking
                    // thread so a slow disk does not stall the runtime.
                    let sent = tokio::task::spawn_blocking(move || tx.send(data).is_ok())
                        .await
                        .map_err(join_err)?;
                    if !sent {
                        break; // the writer failed; its error is reported
                    }
                }
                Err(e) => {
                    fetch_err = Some(e);
                    break;
                }
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(join_err)?;
    if let Some(e) = fetch_err {
        return Err(e);
    }
    let (nodes, bytes) = written?;

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

/// Writes every node under `dir` (an empty directory we created), file
/// data taken in order from `rx`; then modes, owners and mtimes, deepest
/// directories last. Returns (nodes, bytes). Blocking.
fn write_tree(
    m: &Manifest,
    dir: &Path,
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    same_owner: bool,
    progress: &Progress,
) -> Result<(u64, u64), DircacheError> {
    let io = |what: &str, p: &Path, e| DircacheError::io(format!("{what} {}", p.display()), e);
    // What new files get anyway: chown is skipped for nodes that already
    // match (most of a tree saved and restored by the same user).
    let me = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    let mut bytes = 0u64;
    for n in &m.nodes {
        let p = dir.join(&n.path);
        match &n.kind {
            NodeKind::Dir => fs::create_dir(&p).map_err(|e| io("creating", &p, e))?,
            NodeKind::File { size, .. } => {
                // create_new + O_NOFOLLOW: never through or over anything.
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc_nofollow())
                    .mode(0o600)
                    .open(&p)
                    .map_err(|e| io("creating", &p, e))?;
                let mut left = *size;
                while left > 0 {
                    if pos == buf.len() {
                        buf = rx.recv().map_err(|_| {
                            DircacheError::InvalidManifest("the data stream ended early".into())
                        })?;
                        pos = 0;
                    }
                    let take = (buf.len() - pos).min(usize::try_from(left).unwrap_or(usize::MAX));
                    f.write_all(&buf[pos..pos + take])
                        .map_err(|e| io("writing", &p, e))?;
                    pos += take;
                    left -= take as u64;
                    bytes += take as u64;
                    progress
                        .bytes_done
                        .fetch_add(take as u64, Ordering::Relaxed);
                }
                // Metadata through the open descriptor: no second path walk.
                if same_owner && (n.uid, n.gid) != me {
                    std::os::unix::fs::fchown(&f, Some(n.uid), Some(n.gid))
                        .map_err(|e| io("chown", &p, e))?;
                }
                // setuid/setgid are not restored from a cache: an entry is
                // outside input and must not hand out privileges.
                f.set_permissions(fs::Permissions::from_mode(n.mode & 0o1777))
                    .map_err(|e| io("chmod", &p, e))?;
                f.set_modified(mtime(n))
                    .map_err(|e| io("setting the mtime of", &p, e))?;
            }
            NodeKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &p).map_err(|e| io("creating", &p, e))?
            }
            NodeKind::Hardlink { target } => {
                let t = dir.join(target);
                fs::hard_link(&t, &p).map_err(|e| io("linking", &p, e))?
            }
        }
    }
    if pos != buf.len() || rx.recv().is_ok() {
        return Err(DircacheError::InvalidManifest(
            "the data stream is longer than the files".into(),
        ));
    }
    // Metadata after content: a read-only directory would refuse its
    // children, and writing a file would bump its parent's mtime.
    for n in m.nodes.iter().rev() {
        let p = dir.join(&n.path);
        match n.kind {
            NodeKind::Hardlink { .. } | NodeKind::File { .. } => continue,
            NodeKind::Symlink { .. } => {
                if same_owner && (n.uid, n.gid) != me {
                    std::os::unix::fs::lchown(&p, Some(n.uid), Some(n.gid))
                        .map_err(|e| io("chown", &p, e))?;
                }
            }
            NodeKind::Dir => {
                if same_owner && (n.uid, n.gid) != me {
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

fn mtime(n: &crate::manifest::Node) -> std::time::SystemTime {
    let d = Duration::new(n.mtime.unsigned_abs(), n.mtime_nsec.min(999_999_999));
    if n.mtime >= 0 {
        std::time::UNIX_EPOCH + d
    } else {
        std::time::UNIX_EPOCH - d
    }
}

fn libc_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}
