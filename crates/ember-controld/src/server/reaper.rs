//! Housekeeping on a timer: the lost-node reaper (a node silent for
//! [`ServerConfig::heartbeat_timeout`](super::ServerConfig::heartbeat_timeout) loses its runs, which are requeued
//! while they have attempts left) and the log pruner.

use std::time::Duration;

use ember_api::wire::WorkMessage;
use ember_control::LogRetention;
use ember_control::model::RunState;

use super::Shared;

/// Applies [`ServerConfig::log_retention`](super::ServerConfig::log_retention) every
/// [`ServerConfig::prune_interval`](super::ServerConfig::prune_interval) (first right away). Several replicas
/// may prune at once; the store's transactions keep them apart.
pub(super) async fn prune_loop(s: Shared) {
    let retention = s.config.log_retention;
    if retention == LogRetention::default() {
        return;
    }
    let mut tick = tokio::time::interval(s.config.prune_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match s.db(move |st| st.prune_logs(&retention)).await {
            Ok(p) if p.runs > 0 => {
                tracing::info!(runs = p.runs, bytes = p.bytes, "pruned run logs");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %ember_error::chain(&e), "pruning run logs failed"),
        }
    }
}

/// Marks the runs of nodes silent for the heartbeat timeout lost, every
/// [`ServerConfig::reap_interval`](super::ServerConfig::reap_interval), and requeues those with attempts left.
pub(super) async fn reap_lost_nodes(s: Shared) {
    // After a control-plane restart every node's last heartbeat is as old
    // as the downtime: give them one timeout to reconnect before their
    // runs are declared lost.
    tokio::time::sleep(s.config.heartbeat_timeout).await;
    let mut tick = tokio::time::interval(s.config.reap_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stale = u64::try_from(s.config.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
        let result = s
            .db(move |st| {
                let lost = st.mark_lost_runs(stale)?;
                let mut requeued = 0;
                for run in &lost {
                    if run.attempts < run.max_attempts.max(1)
                        && st
                            .transition_run(run.id, RunState::Lost, RunState::Queued)
                            .is_ok()
                    {
                        requeued += 1;
                    }
                }
                Ok((lost, requeued))
            })
            .await;
        match result {
            Ok((lost, requeued)) if !lost.is_empty() => {
                tracing::warn!(lost = lost.len(), requeued, "runs lost with their nodes");
                // Those not requeued end lost.
                for _ in requeued..lost.len() {
                    s.metrics.finished(RunState::Lost);
                }
                for r in &lost {
                    let _ = s.log_events.send(r.id);
                    // A node that is only cut off, its stream still open
                    // here, hears this once its link is back (or sees the
                    // run missing from its next stream's first line).
                    if let Some(node) = &r.node {
                        s.push(
                            node,
                            WorkMessage::Cancel {
                                run: r.id,
                                attempt: Some(r.attempts),
                            },
                        );
                    }
                }
                s.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %ember_error::chain(&e), "reaping lost nodes failed"),
        }
    }
}
