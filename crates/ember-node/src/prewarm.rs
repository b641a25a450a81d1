//! Pre-warming: a `prewarm` order on the work stream (keep N idle runners
//! of a deployment's key) pulls the image if needed and creates the
//! missing runners idle in the pool ([`ember_pool::Pool::prewarm`]); the
//! next heartbeat reports them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_control::model::PinnedImage;
use ember_pool::{RunnerImage, RunnerShape, RunnerSpec};

use crate::agent::NodeAgent;

/// A pre-warm that failed (bad image, no space) is not tried again for
/// this key until this has passed, though the control plane repeats the
/// order at every heartbeat.
const PREWARM_RETRY: Duration = Duration::from_secs(30);

/// Carries out `order` (of `deployment`) in a task of its own; a failure
/// holds off further orders of its key for [`PREWARM_RETRY`].
pub(crate) fn spawn_prewarm(agent: &Arc<NodeAgent>, deployment: String, order: PrewarmOrder) {
    let agent = agent.clone();
    tokio::spawn(async move {
        match prewarm(&agent, &order).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(%deployment, n, "pre-warmed runners");
                agent.inventory_changed.notify_one();
            }
            Err(error) => {
                tracing::warn!(%deployment, %error, "pre-warming failed");
                agent
                    .prewarm_failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(order.key, Instant::now());
            }
        }
    });
}

/// A `prewarm` message's order.
pub(crate) struct PrewarmOrder {
    /// The control plane's warm key of the deployment.
    pub(crate) key: String,
    /// The image its runners run.
    pub(crate) image: PinnedImage,
    /// Their resources and root filesystem.
    pub(crate) shape: RunnerShape,
    /// The recycling scope: the pool's recycling key.
    pub(crate) scope: Option<String>,
    /// Idle runners wanted.
    pub(crate) count: u32,
}

/// Creates the idle runners `order` is missing (counting those idle and
/// those being created for its key); returns how many it created.
async fn prewarm(agent: &Arc<NodeAgent>, order: &PrewarmOrder) -> Result<u32, String> {
    let failed_at = agent
        .prewarm_failed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&order.key)
        .copied();
    if failed_at.is_some_and(|t| t.elapsed() < PREWARM_RETRY) {
        return Ok(0);
    }
    let record = agent.ensure_image(&order.image).await?;
    let agent = agent.clone();
    let key = order.key.clone();
    let (shape, scope, count) = (order.shape.clone(), order.scope.clone(), order.count);
    tokio::task::spawn_blocking(move || {
        let image = RunnerImage::from_store(&agent.store, &record)
            .map_err(|e| format!("reading the image config: {}", ember_error::chain(&e)))?;
        let spec = RunnerSpec::new(image, shape, scope);
        let pool_key = spec.key().as_str().to_owned();
        agent
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pool_key.clone(), key.clone());
        // Decided under the lock, so two copies of the order arriving
        // together create the missing runners once.
        let missing = {
            let mut creating = agent.prewarming.lock().unwrap_or_else(|e| e.into_inner());
            let idle = agent
                .pool
                .idle_runners()
                .iter()
                .filter(|r| r.key.as_str() == pool_key)
                .count();
            let have = u32::try_from(idle)
                .unwrap_or(u32::MAX)
                .saturating_add(creating.get(&key).copied().unwrap_or(0));
            let missing = count.saturating_sub(have);
            if missing > 0 {
                *creating.entry(key.clone()).or_default() += missing;
            }
            missing
        };
        let mut created = 0;
        let mut result = Ok(());
        for _ in 0..missing {
            // Once one fails, the rest would too: give up their share.
            if result.is_ok() {
                match agent.pool.prewarm(&spec) {
                    Ok(id) => {
                        tracing::debug!(%id, key = %key, "pre-warmed runner");
                        created += 1;
                    }
                    // The node is stopping: not a failure of the order.
                    Err(ember_pool::PoolError::ShutDown) => result = Err(None),
                    Err(e) => {
                        result = Err(Some(format!(
                            "creating a runner: {}",
                            ember_error::chain(&e)
                        )))
                    }
                }
            }
            // Only now that the runner is idle (and so counted there) does
            // it stop counting as being created.
            let mut creating = agent.prewarming.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = creating.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    creating.remove(&key);
                }
            }
        }
        match result {
            Ok(()) | Err(None) => Ok(created),
            Err(Some(e)) => Err(e),
        }
    })
    .await
    .map_err(|e| format!("pre-warm task failed: {e}"))?
}
