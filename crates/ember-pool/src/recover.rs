//! Recovery of runners a dead pool process left behind.
//!
//! `ember_runtime::recover` does most of the work, because runner
//! directories have the layout of its containers (a `lock` file the owner
//! keeps `flock`ed, `config.json` with the cgroup path). Two things are the
//! pool's own:
//!
//! * **Thaw first.** A runner may have died frozen. `runc delete --force`
//!   sends SIGKILL and waits for the container to stop, but frozen tasks
//!   do not act on signals until thawed, so the delete would fail.
//! * **Store claims.** Each runner claimed its image in the store under its
//!   own id; the claim goes with the runner.

use std::fs::{self, File};
use std::io;
use std::path::Path;

use ember_runtime::cgroup::{Cgroups, FreezerState};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::PoolError;
use crate::pool::PoolRecoverReport;
use crate::runner::{Env, RECORD_FILE, RunnerRecord};

pub(crate) fn recover(env: &Env) -> Result<PoolRecoverReport, PoolError> {
    let mut report = PoolRecoverReport::default();
    let dir_err = |source| PoolError::Dir {
        path: env.runners_dir.clone(),
        source,
    };
    let entries = match fs::read_dir(&env.runners_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(dir_err(e)),
    };
    for entry in entries {
        let entry = entry.map_err(dir_err)?;
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        // Held only while thawing; the runtime's recovery takes it again.
        let Some(_lock) = stale_lock(&dir) else {
            continue;
        };
        let id = runner_id(&dir);
        if let Some(path) = ember_runtime::cgroup::bundle_cgroups_path(&dir) {
            let cg = Cgroups::for_path(&path);
            if matches!(
                cg.freezer_state(),
                Ok(FreezerState::Frozen | FreezerState::Freezing)
            ) {
                match cg.thaw() {
                    Ok(()) => report.thawed.push(id.clone()),
                    Err(e) => {
                        tracing::warn!(id, error = %ember_error::chain(&e), "thawing a leftover runner")
                    }
                }
            }
        }
    }

    report.runtime = ember_runtime::recover(&env.runners_dir, &env.runc)?;
    for dir in &report.runtime.removed {
        let id = runner_id(dir);
        if let Some(store) = &env.store {
            store.remove_user(&id);
        }
        report.runners.push(id);
    }
    if !report.runners.is_empty() {
        tracing::info!(runners = ?report.runners, "removed leftover runners");
    }
    Ok(report)
}

/// `Some` (holding the lock) when no live process holds `dir`'s lock;
/// `None` when one does. A directory without a lock file is stale.
enum Lock {
    Held(#[allow(dead_code)] Flock<File>),
    Missing,
}

fn stale_lock(dir: &Path) -> Option<Lock> {
    let file = match File::open(dir.join(ember_runtime::container::LOCK_FILE)) {
        Ok(f) => f,
        Err(_) => return Some(Lock::Missing),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Some(Lock::Held(l)),
        Err((_, Errno::EWOULDBLOCK)) => None,
        // Cannot tell: treat it as live rather than destroy someone's runner.
        Err(_) => None,
    }
}

/// The runner id of a directory: from its record, else its name (a
/// directory renamed into place has the id as name; one still being set up
/// is `.new-<id>`).
fn runner_id(dir: &Path) -> String {
    if let Some(rec) = fs::read(dir.join(RECORD_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<RunnerRecord>(&b).ok())
    {
        return rec.id;
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_prefix(".new-")
        .map(str::to_owned)
        .unwrap_or(name)
}
