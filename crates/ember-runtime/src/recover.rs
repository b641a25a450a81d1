//! Cleaning up after an Ember process that died without cleaning up
//! (`kill -9`, a crash, power loss).
//!
//! Every container directory under the base directory holds a `lock` file
//! that its owner keeps `flock`ed; the kernel releases the lock when the
//! owner dies. [`recover`] therefore only touches directories whose lock it
//! can take, and leaves the containers of live Ember processes alone. For
//! each leftover it:
//!
//! 1. deletes the runc container whose bundle is that directory (`runc
//!    delete --force` kills what still runs);
//! 2. removes the container's cgroups if runc left any (a runc killed in the
//!    middle of `create`), killing stray processes first;
//! 3. unmounts every mount below the directory (from `/proc/self/mountinfo`,
//!    deepest first, lazily if busy);
//! 4. removes the directory.
//!
//! runc containers whose bundle lies under the base directory but no longer
//! exists are deleted too.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::cgroup;
use crate::container::LOCK_FILE;
use crate::mount::{self, MountError};
use crate::runc::{Runc, RuncError};

/// Errors from recovery. [`recover`] fails only when it cannot even look;
/// the failures of single leftovers are collected in
/// [`RecoverReport::errors`].
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The base directory could not be listed.
    #[error("cannot list container directories in {path}")]
    ReadDir {
        /// The base directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// runc failed.
    #[error(transparent)]
    Runc(#[from] RuncError),
    /// Unmounting or reading the mount table failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A leftover directory could not be removed.
    #[error("cannot remove leftover container directory {path}")]
    RemoveDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A leftover cgroup could not be removed.
    #[error("cannot remove leftover cgroup {path}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What [`recover`] found and did.
#[derive(Debug, Default)]
pub struct RecoverReport {
    /// runc containers deleted.
    pub deleted: Vec<String>,
    /// Mount points unmounted.
    pub unmounted: Vec<PathBuf>,
    /// Cgroup directories removed.
    pub cgroups_removed: Vec<PathBuf>,
    /// Container directories removed.
    pub removed: Vec<PathBuf>,
    /// Container directories left alone because a live process holds them.
    pub in_use: Vec<PathBuf>,
    /// What could not be cleaned up.
    pub errors: Vec<RecoverError>,
}

impl RecoverReport {
    /// Whether nothing was left over.
    pub fn is_clean(&self) -> bool {
        self.deleted.is_empty()
            && self.unmounted.is_empty()
            && self.cgroups_removed.is_empty()
            && self.removed.is_empty()
            && self.errors.is_empty()
    }
}

/// Finds and removes the leftovers of dead Ember processes among the
/// container directories in `base_dir` and the containers of `runc`'s root.
pub fn recover(base_dir: &Path, runc: &Runc) -> Result<RecoverReport, RecoverError> {
    let mut report = RecoverReport::default();
    let base = match fs::canonicalize(base_dir) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => base_dir.to_path_buf(),
        Err(source) => {
            return Err(RecoverError::ReadDir {
                path: base_dir.to_path_buf(),
                source,
            });
        }
    };

    // Stale directories stay locked by us until they are gone, so a new
    // Ember cannot start using one halfway through.
    let mut stale: Vec<(PathBuf, Option<Flock<File>>)> = Vec::new();
    match fs::read_dir(&base) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|source| RecoverError::ReadDir {
                    path: base.clone(),
                    source,
                })?;
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let dir = entry.path();
                match try_lock(&dir) {
                    LockState::Held => report.in_use.push(dir),
                    LockState::Taken(lock) => stale.push((dir, lock)),
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(RecoverError::ReadDir {
                path: base.clone(),
                source,
            });
        }
    }

    // runc containers of stale or vanished directories.
    let list = if runc.root().exists() {
        runc.list()?
    } else {
        Vec::new()
    };
    for c in list {
        let bundle = fs::canonicalize(&c.bundle).unwrap_or_else(|_| c.bundle.clone());
        if !bundle.starts_with(&base) || report.in_use.contains(&bundle) {
            continue;
        }
        if !bundle.exists() || stale.iter().any(|(d, _)| d == &bundle) {
            match runc.delete(&c.id, true) {
                Ok(()) => report.deleted.push(c.id),
                Err(e) => report.errors.push(e.into()),
            }
        }
    }

    for (dir, lock) in stale {
        remove_cgroups(&dir, &mut report);
        match mount::mounts_under(&dir) {
            Ok(points) => {
                for p in points {
                    match mount::unmount(&p) {
                        Ok(()) => report.unmounted.push(p),
                        Err(e) => report.errors.push(e.into()),
                    }
                }
            }
            Err(e) => report.errors.push(e.into()),
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => report.removed.push(dir),
            Err(source) => report
                .errors
                .push(RecoverError::RemoveDir { path: dir, source }),
        }
        drop(lock);
    }
    if !report.is_clean() {
        tracing::info!(?report, "recovered leftovers");
    }
    Ok(report)
}

enum LockState {
    /// A live process holds the directory.
    Held,
    /// Ours now (or there was no lock file: a directory never fully
    /// prepared).
    Taken(Option<Flock<File>>),
}

fn try_lock(dir: &Path) -> LockState {
    let file = match File::open(dir.join(LOCK_FILE)) {
        Ok(f) => f,
        Err(_) => return LockState::Taken(None),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => LockState::Taken(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => LockState::Held,
        // Cannot tell: treat as live rather than destroy someone's work.
        Err(_) => LockState::Held,
    }
}

fn remove_cgroups(dir: &Path, report: &mut RecoverReport) {
    let Some(rel) = cgroup::bundle_cgroups_path(dir) else {
        return;
    };
    let rel = rel.trim_start_matches('/');
    // A path with `..` in it did not come from Ember's own spec.
    if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
        return;
    }
    let groups = match cgroup::existing_in_every_hierarchy(rel) {
        Ok(g) => g,
        Err(e) => {
            report.errors.push(e.into());
            return;
        }
    };
    if groups.is_empty() {
        return;
    }
    // Thaw first: frozen processes cannot die.
    for g in &groups {
        cgroup::thaw_dir(g);
    }
    for g in groups {
        match cgroup::remove_dir(&g) {
            Ok(()) => report.cgroups_removed.push(g),
            Err(source) => report.errors.push(RecoverError::Cgroup { path: g, source }),
        }
    }
}
