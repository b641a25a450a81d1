//! Who owns what in `tmp/`, judged by locks rather than pids.
//!
//! Every open store holds an `flock` on a lock file of its own,
//! `tmp/<owner>-lock`, for as long as it lives, and names every entry it
//! makes `tmp/<owner>-...`. The kernel drops the lock when the process
//! dies however it dies (`kill -9` included, before it is even reaped), so
//! a later open that can take an owner's lock knows that owner is gone and
//! removes its entries. A pid could not say that: a zombie's pid still
//! answers `kill(pid, 0)`, and a pid is reused (a node restarted in a new
//! PID namespace, or a busy machine, gets the dead process's number), and
//! then partial layers of a dead pull stayed in `tmp/` for good.
//!
//! `<owner>` is `<pid>.<nanoseconds>`, unique per open. Entries named by a
//! bare pid (`<pid>-...`, made by Ember before these locks) are still
//! judged by whether the pid is alive.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{StoreError, io};

/// The suffix of an owner's lock file: `tmp/<owner>-lock`.
const LOCK_SUFFIX: &str = "-lock";

/// A store's claim on its entries in `tmp/`: the open, `flock`ed lock
/// file. Dropping it releases the claim; what the owner left in `tmp/`
/// is then removed by the next open.
#[derive(Debug)]
pub(crate) struct TmpOwner {
    /// `<pid>.<nanoseconds>`; the prefix of every entry this owner makes.
    pub(crate) token: String,
    /// Held (with `LOCK_EX`) while this owner lives. Opened `O_CLOEXEC`
    /// (std's default), so no child process (runc, a container) inherits
    /// it and keeps a dead owner looking alive.
    _lock: File,
}

/// `flock(fd, op)`; `Ok(false)` when `LOCK_NB` found it held elsewhere.
fn flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor `file` owns.
    let r = unsafe { libc::flock(file.as_raw_fd(), op) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Whether `file` is still the file at `path` (not unlinked or replaced).
fn is_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl TmpOwner {
    /// Creates and locks a fresh lock file in `tmp`.
    pub(crate) fn new(tmp: &Path) -> Result<TmpOwner, StoreError> {
        loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let token = format!("{}.{nanos:x}", std::process::id());
            let path = tmp.join(format!("{token}{LOCK_SUFFIX}"));
            let file = match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => f,
                // The same nanosecond twice: try the next one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("create", &path)(e)),
            };
            // Between the create and the lock another process's cleanup
            // may have taken the lock and removed the file as abandoned;
            // then this lock would guard nothing, so start again.
            if flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io("lock", &path))?
                && is_at(&file, &path)
            {
                return Ok(TmpOwner { token, _lock: file });
            }
        }
    }
}

/// The owner part of a `tmp/` entry's name (up to the first `-`).
fn owner_of(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}

/// Removes what owners that are gone left in `tmp`; `mine` is the caller's
/// own owner token, never judged. Returns the removed paths.
pub(crate) fn clean(tmp: &Path, mine: &str) -> Result<Vec<PathBuf>, StoreError> {
    let mut by_owner: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for e in fs::read_dir(tmp).map_err(io("read", tmp))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        by_owner
            .entry(owner_of(&name).to_owned())
            .or_default()
            .push(e.path());
    }
    let mut removed = Vec::new();
    for (owner, mut paths) in by_owner {
        if owner == mine {
            continue;
        }
        // An entry of an older Ember, named by its process id alone.
        if let Ok(pid) = owner.parse::<u32>() {
            if pid != std::process::id() && !crate::pid_alive(pid) {
                remove_all(&paths, &mut removed);
            }
            continue;
        }
        let lock_path = tmp.join(format!("{owner}{LOCK_SUFFIX}"));
        // Held while its entries go, so the owner's lock file goes last
        // and no other cleanup works on the same owner meanwhile.
        let _held = match File::open(&lock_path) {
            // No lock file: nobody can own these (an owner creates its
            // lock before any entry).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("open", &lock_path)(e)),
            Ok(f) => match flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(true) => Some(f),
                // Its owner is alive.
                Ok(false) => continue,
                // Cannot tell: keep them rather than pull the floor from
                // under a live process.
                Err(e) => {
                    tracing::warn!(path = %lock_path.display(), error = %ember_error::chain(&e), "cannot tell whether tmp/ entries are abandoned");
                    continue;
                }
            },
        };
        // The lock file last.
        paths.sort_by_key(|p| *p == lock_path);
        remove_all(&paths, &mut removed);
    }
    Ok(removed)
}

fn remove_all(paths: &[PathBuf], removed: &mut Vec<PathBuf>) {
    for p in paths {
        tracing::info!(path = %p.display(), "removing abandoned temporary data");
        match crate::remove_any(p) {
            Ok(()) => removed.push(p.clone()),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %ember_error::chain(&e), "removing abandoned temporary data")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("read tmp")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A live owner's entries stay (its lock is held, in this very
    /// process too: flock locks belong to the open file); once it is
    /// dropped its entries and its lock file go, and ownerless or legacy
    /// dead-pid entries go; the cleaner's own are never judged.
    #[test]
    fn entries_go_with_their_owners_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path();
        let live = TmpOwner::new(tmp).expect("live owner");
        let dead = TmpOwner::new(tmp).expect("dead owner");
        let mine = TmpOwner::new(tmp).expect("cleaner");
        for (owner, what) in [(&live, "layer"), (&dead, "layer"), (&mine, "blob")] {
            fs::create_dir(tmp.join(format!("{}-1-0-{what}", owner.token))).expect("entry");
        }
        fs::write(tmp.join("nobody.99-1-0-index"), b"").expect("ownerless");
        // Above any pid_max: no such process.
        fs::write(tmp.join("99999999-1-0-index"), b"").expect("legacy");
        let dead_token = dead.token.clone();
        drop(dead);

        let removed = clean(tmp, &mine.token).expect("clean");
        assert_eq!(removed.len(), 4, "{removed:?}");
        let left = names(tmp);
        let want = {
            let mut w = vec![
                format!("{}-1-0-layer", live.token),
                format!("{}-lock", live.token),
                format!("{}-1-0-blob", mine.token),
                format!("{}-lock", mine.token),
            ];
            w.sort();
            w
        };
        assert_eq!(left, want);
        assert!(!left.iter().any(|n| n.starts_with(&dead_token)));
    }
}
