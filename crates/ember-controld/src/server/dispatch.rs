//! The dispatcher: woken through [`AppState::wake`], it claims queued
//! runs, places each ([`ember_control::schedule`]), assigns it and pushes
//! it on its node's work stream. This is where a node is chosen for a run
//! (the choice itself is the scheduler's).

use ember_api::wire::WorkMessage;
use ember_control::StoreError;
use ember_control::model::RunState;
use ember_control::schedule::{BatchScheduler, ClusterView, RunRequirements};
use ember_control::store::{ClaimRequest, RunFilter};

use super::{AppState, Shared};

/// How many queued runs one dispatcher round claims. Runs are placed and
/// pushed one at a time within a round, so this bounds the claim
/// transaction, not the latency of the first run.
const CLAIM_BATCH: usize = 64;
/// A claim's lease: a dispatcher that dies holding claims strands them for
/// at most this long.
const CLAIM_LEASE_MS: u64 = 30_000;

/// Claims and places until a round finds nothing more to do, each time
/// [`AppState::wake`] is notified.
pub(super) async fn dispatch_loop(s: Shared) {
    loop {
        s.wake.notified().await;
        loop {
            let st = s.clone();
            let round = tokio::task::spawn_blocking(move || dispatch_round(&st)).await;
            match round {
                // More may be queued than one claim took: go again at once.
                Ok(Ok(DispatchRound {
                    took_limit: true,
                    assigned,
                    ..
                })) if assigned > 0 => {}
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    tracing::error!(error = %ember_error::chain(&e), "dispatch failed");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %ember_error::chain(&e), "dispatch task failed");
                    break;
                }
            }
        }
    }
}

struct DispatchRound {
    assigned: usize,
    /// The claim got as many runs as it asked for (there may be more).
    took_limit: bool,
}

/// One claim → place → assign → push round. Each run is pushed to its node
/// as soon as it is assigned, before the next one is placed.
fn dispatch_round(s: &AppState) -> Result<DispatchRound, StoreError> {
    let idle = DispatchRound {
        assigned: 0,
        took_limit: false,
    };
    let connected = s.connected_nodes();
    if connected.is_empty() {
        return Ok(idle);
    }
    let nodes: Vec<_> = s
        .store
        .list_nodes()?
        .into_iter()
        .filter(|n| connected.contains(&n.spec.id))
        .collect();
    let active = s.store.list_runs(&RunFilter {
        states: vec![RunState::Scheduled, RunState::Starting, RunState::Running],
        ..RunFilter::default()
    })?;
    let stale = u64::try_from(s.config.heartbeat_timeout.as_millis()).unwrap_or(u64::MAX);
    let view = ClusterView::build(&nodes, &active, s.clock.now(), stale);
    // Claim no more than could be placed now: in a burst every exit wakes
    // a round, and claiming a full batch only to release it again would
    // cost a write per queued run per freed slot.
    let free: usize = view.nodes.iter().map(|n| n.free() as usize).sum();
    if free == 0 {
        return Ok(idle);
    }
    let limit = free.min(CLAIM_BATCH);
    let claimed = s.store.claim_runs(&ClaimRequest {
        owner: s.owner.clone(),
        limit,
        lease_ms: CLAIM_LEASE_MS,
    })?;
    if claimed.is_empty() {
        return Ok(idle);
    }
    let mut scheduler = BatchScheduler::new(view);
    let mut unplaced = Vec::new();
    let mut assigned = 0;
    for run in &claimed {
        let Some(p) = scheduler.place_next(&RunRequirements::from(run)) else {
            unplaced.push(run.id);
            continue;
        };
        match s.store.assign_run(&s.owner, run.id, &p.node) {
            Ok(run) => {
                assigned += 1;
                let id = run.id;
                tracing::debug!(run = %id, node = %p.node, reason = ?p.reason, "assigned");
                if !s.push(&p.node, WorkMessage::Assign { run: Box::new(run) }) {
                    // It stays scheduled there; the node gets it when it
                    // reconnects, or it is lost with the node.
                    tracing::warn!(run = %id, node = %p.node, "node disconnected after assignment");
                }
            }
            // Cancelled meanwhile, or the claim lapsed: not ours any more.
            Err(StoreError::NotClaimed { .. } | StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    if !unplaced.is_empty() {
        s.store.release_claims(&s.owner, &unplaced)?;
    }
    Ok(DispatchRound {
        assigned,
        took_limit: claimed.len() == limit,
    })
}
