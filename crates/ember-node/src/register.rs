//! Registration and heartbeats (`PUT /v1/nodes/{id}`): the node's slots,
//! labels and inventory (images held, idle runners by warm key, free
//! disk), sent at start, after every reconnect, at the heartbeat interval
//! and soon after the inventory changes. The answer names the
//! checkpoints the node reported whose deployment is gone (deleted, or no
//! longer a snapshot deployment); the node removes them.

use std::sync::Arc;
use std::time::Duration;

use ember_api::client::ClientError;
use ember_control::model::{ImageLayer, Inventory, NodeSpec};

use crate::agent::NodeAgent;

impl NodeAgent {
    /// What this node holds now; reads the store's index and the pool.
    fn inventory(&self) -> Inventory {
        let mut inv = Inventory {
            free_disk_bytes: self.store.free_bytes().unwrap_or(0),
            snapshots: self.snapshots.held(),
            ..Inventory::default()
        };
        if let Ok(ix) = self.store.read_index() {
            for rec in ix.images.values() {
                let bytes = ix.bytes_of([rec]);
                let layers: Vec<ImageLayer> = rec
                    .layers
                    .iter()
                    .map(|l| ImageLayer {
                        diff_id: l.diff_id.to_string(),
                        bytes: ix.layers.get(&l.diff_id).map_or(0, |r| r.bytes),
                    })
                    .collect();
                inv.images.insert(rec.manifest.to_string(), bytes);
                inv.image_layers
                    .insert(rec.manifest.to_string(), layers.clone());
                if let Some(index) = &rec.index {
                    inv.images.insert(index.to_string(), bytes);
                    inv.image_layers.insert(index.to_string(), layers);
                }
            }
        }
        inv.pulling = self.prepull.pulling();
        inv.image_budget_bytes = self.cfg.prepull.image_budget;
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        for idle in self.pool.idle_runners() {
            if let Some(k) = keys.get(idle.key.as_str()) {
                *inv.idle_runners.entry(k.clone()).or_default() += 1;
            }
        }
        inv
    }

    /// Registers, or refreshes the registration with the inventory now.
    pub(crate) async fn heartbeat(self: &Arc<Self>) -> Result<(), ClientError> {
        let me = self.clone();
        let inventory = tokio::task::spawn_blocking(move || me.inventory())
            .await
            .unwrap_or_default();
        let spec = NodeSpec {
            id: self.cfg.id.clone(),
            slots: self.cfg.slots,
            labels: self.cfg.labels.clone(),
            inventory,
        };
        let answer = self.client.put_node(&spec).await?;
        if !answer.stale_snapshots.is_empty() {
            // Removing checkpoints is file work: off the runtime threads.
            let me = self.clone();
            let stale = answer.stale_snapshots;
            let _ = tokio::task::spawn_blocking(move || {
                if me.snapshots.drop_stale(&stale) > 0 {
                    // The next heartbeat no longer reports them.
                    me.inventory_changed.notify_one();
                }
            })
            .await;
        }
        Ok(())
    }
}

/// Inventory changes are sent at most this often: under a burst every run
/// changes the idle-runner count, and nothing on a run's path waits for
/// the heartbeat (the exit report carries what the warm hand-off needs).
const INVENTORY_MIN_GAP: Duration = Duration::from_millis(100);

/// How often the store's index file is looked at for changes made by
/// other processes (`ember image import`, `ember pull`, `ember rmi` on the
/// node's store): one `stat` a tick, and an imported image is in the
/// control plane's view within about this long.
const INDEX_WATCH: Duration = Duration::from_millis(500);

/// The store index's modification time (and size, for writes within one
/// timestamp tick); `None` while there is no index yet.
fn index_stamp(agent: &NodeAgent) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(agent.store.index_path()).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Returns once the store's index differs from `seen` (every index write
/// renames a new file into place, so the stamp changes with each one).
async fn index_changed(agent: &NodeAgent, seen: Option<(std::time::SystemTime, u64)>) {
    loop {
        tokio::time::sleep(INDEX_WATCH).await;
        if index_stamp(agent) != seen {
            return;
        }
    }
}

/// Heartbeats until aborted: at the interval, or sooner when the
/// inventory changed, whether by this agent (it notifies) or by another
/// process writing the store's index (an `ember image import` on this
/// node's store: runs of that image then prefer this node at once).
pub(crate) async fn heartbeat_loop(agent: Arc<NodeAgent>) {
    let mut seen = index_stamp(&agent);
    loop {
        tokio::select! {
            () = tokio::time::sleep(agent.cfg.heartbeat) => {}
            () = agent.inventory_changed.notified() => {}
            () = index_changed(&agent, seen) => {}
        }
        // Taken before the heartbeat reads the index, so a write that
        // lands while it is sent triggers the next one.
        seen = index_stamp(&agent);
        let sent = tokio::time::Instant::now();
        if let Err(e) = agent.heartbeat().await {
            tracing::warn!(error = %ember_error::chain(&e), "heartbeat failed");
        }
        tokio::time::sleep_until(sent + INVENTORY_MIN_GAP).await;
    }
}
