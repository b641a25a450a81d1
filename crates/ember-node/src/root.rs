//! The node's root: one agent per root at a time, and the pool that lives
//! under it.

use std::path::Path;
use std::time::{Duration, Instant};

use ember_pool::PoolConfig;
use ember_runtime::Runc;
use ember_store::Store;

use crate::NodeError;

/// `<root>/node.lock`: `flock`ed by the node agent for its whole life (and
/// briefly by a watchdog cleaning up after a dead one), so one root has
/// one node agent at a time and a watchdog can tell whether a new agent
/// has taken over.
pub(crate) const NODE_LOCK: &str = "node.lock";

/// How long a starting node waits for the root's lock: a dead
/// predecessor's watchdog holds it while it destroys the old runners.
const ROOT_LOCK_WAIT: Duration = Duration::from_secs(60);

/// Tries to take `<root>/node.lock` without waiting; `Ok(None)` if another
/// process holds it. The descriptor is close-on-exec (std's default), so
/// runc and the containers never hold it after this process dies.
pub(crate) fn try_lock_root(root: &Path) -> Result<Option<std::fs::File>, NodeError> {
    std::fs::create_dir_all(root).map_err(|source| NodeError::Io {
        what: "creating",
        path: root.to_path_buf(),
        source,
    })?;
    let path = root.join(NODE_LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| NodeError::Io {
            what: "opening",
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(source)) => Err(NodeError::Io {
            what: "locking",
            path,
            source,
        }),
    }
}

/// Takes `<root>/node.lock`, waiting up to [`ROOT_LOCK_WAIT`] for a
/// watchdog that is still cleaning up after a dead predecessor.
pub(crate) async fn lock_root(root: &Path) -> Result<std::fs::File, NodeError> {
    let deadline = Instant::now() + ROOT_LOCK_WAIT;
    loop {
        if let Some(f) = try_lock_root(root)? {
            return Ok(f);
        }
        if Instant::now() >= deadline {
            return Err(NodeError::RootInUse(root.join(NODE_LOCK)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pool's configuration for a node root; the same for the node and
/// for its watchdog, so both see the same runners.
pub(crate) fn pool_config(root: &Path, agent: &Path, store: Store, slots: u32) -> PoolConfig {
    let mut pool_cfg = PoolConfig::new(root.join("pool"), Runc::new(root.join("runc")), agent);
    pool_cfg.store = Some(store);
    pool_cfg.max_runners = (slots as usize * 2).max(4);
    pool_cfg
}
