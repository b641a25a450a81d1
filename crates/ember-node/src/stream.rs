//! The work stream (`GET /v1/nodes/{id}/work`): one long-lived response of
//! JSON lines carrying assignments, cancels and pre-warm orders, kept open
//! across drops and silences, and what the node does with each message.
//!
//! The stream is watched for silence: the server announces its keepalive
//! interval in the first line, and three intervals without a byte mean the
//! connection is dead (a NAT or proxy dropped it without a reset). The
//! node then reconnects with exponential backoff, and the new stream's
//! first line reconciles the runs: runs the control plane has active here
//! that this process does not know are reported lost, and runs this
//! process executes that are no longer its own are stopped.

use std::sync::Arc;
use std::time::Duration;

use ember_api::client::ClientError;
use ember_api::wire::WorkMessage;
use ember_control::model::{NodeReport, RunId};

use crate::agent::NodeAgent;
use crate::execute::{RunHandle, execute, shape_of};
use crate::prewarm::{PrewarmOrder, spawn_prewarm};

/// How long a new work stream may stay silent before its first line (which
/// the server sends at once) tells the keepalive interval.
const FIRST_LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// Silence on the work stream longer than this many keepalive intervals
/// means the connection is dead.
const KEEPALIVE_MISSES: u32 = 3;

/// Reconnect backoff: the first retry after a second (as quick as a
/// control-plane restart needs), doubling up to half a minute.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Keeps the work stream open, reconnecting when it drops or goes silent.
pub(crate) async fn work_loop(agent: Arc<NodeAgent>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut connected = false;
        if let Err(e) = work_once(&agent, &mut connected).await {
            tracing::warn!(error = %ember_error::chain(&e), "work stream ended");
        }
        // A stream that delivered its first line was a working connection:
        // the next failure starts the backoff over.
        if connected {
            backoff = BACKOFF_MIN;
        }
        // Back off before reconnecting; this delay is only ever paid after
        // a lost connection, never on the path of a run. The jitter keeps
        // a fleet of nodes from reconnecting in lockstep.
        tokio::time::sleep(backoff + jitter(backoff / 5)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if let Err(e) = agent.heartbeat().await {
            tracing::warn!(error = %ember_error::chain(&e), "re-registering failed");
        }
    }
}

/// Up to `max`, from the clock's low bits (no randomness crate for this).
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let max_ms = u32::try_from(max.as_millis()).unwrap_or(u32::MAX).max(1);
    Duration::from_millis(u64::from(nanos % max_ms))
}

/// Reads one work stream until it ends, fails or stays silent past three
/// keepalive intervals; sets `connected` once its first line arrived.
async fn work_once(agent: &Arc<NodeAgent>, connected: &mut bool) -> Result<(), ClientError> {
    let mut resp = agent.client.work(&agent.cfg.id).await?;
    tracing::info!(node = %agent.cfg.id, "connected to the control plane");
    let mut buf: Vec<u8> = Vec::new();
    // Until the first line says otherwise (a server without keepalives
    // says nothing), no silence limit applies after it.
    let mut silence = Some(FIRST_LINE_TIMEOUT);
    loop {
        let next = resp.chunk();
        let chunk = match silence {
            Some(limit) => match tokio::time::timeout(limit, next).await {
                Ok(c) => c,
                Err(_) => {
                    return Err(ClientError::Http {
                        url: agent.client.base().to_owned(),
                        detail: format!(
                            "work stream silent for {} ms; reconnecting",
                            limit.as_millis()
                        ),
                    });
                }
            },
            None => next.await,
        };
        let chunk = chunk.map_err(|e| ClientError::Http {
            url: agent.client.base().to_owned(),
            detail: ember_error::chain(&e).to_string(),
        })?;
        let Some(chunk) = chunk else { return Ok(()) };
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            match serde_json::from_slice::<WorkMessage>(&line) {
                Ok(msg) => {
                    if let WorkMessage::Active { keepalive_ms, .. } = &msg {
                        *connected = true;
                        silence = keepalive_ms.map(|ms| {
                            Duration::from_millis(ms.max(1)).saturating_mul(KEEPALIVE_MISSES)
                        });
                    }
                    handle(agent, msg);
                }
                Err(e) => tracing::warn!(error = %ember_error::chain(&e), "bad work message"),
            }
        }
    }
}

fn handle(agent: &Arc<NodeAgent>, msg: WorkMessage) {
    match msg {
        WorkMessage::Assign { run } => {
            let handle = Arc::new(RunHandle::new(run.attempts));
            {
                let mut runs = agent.runs.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(old) = runs.get(&run.id) {
                    if old.attempt == run.attempts {
                        // Sent again after a reconnect; already ours.
                        return;
                    }
                    // An earlier attempt, which the control plane gave up
                    // on (lost while this node was cut off) and retried
                    // here: stop it (its reports are refused by now) and
                    // run the new one.
                    tracing::warn!(run = %run.id, old = old.attempt, new = run.attempts, "a new attempt of a run still executing here; stopping the old one");
                    let old = old.clone();
                    tokio::task::spawn_blocking(move || old.cancel());
                }
                runs.insert(run.id, handle.clone());
            }
            let agent = agent.clone();
            tracing::debug!(run = %run.id, "assigned");
            // The run's image is not the node GC's to evict meanwhile.
            let busy = agent.prepull.busy(&run.image.digest);
            let span = tracing::info_span!("run", run = %run.id);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let _busy = busy;
                    let id = run.id;
                    let permit = agent.slots.clone().acquire_owned().await;
                    tracing::debug!(run = %id, "slot taken");
                    execute(&agent, *run, handle.clone()).await;
                    drop(permit);
                    let mut runs = agent.runs.lock().unwrap_or_else(|e| e.into_inner());
                    // Not a newer attempt's entry.
                    if runs.get(&id).is_some_and(|h| Arc::ptr_eq(h, &handle)) {
                        runs.remove(&id);
                    }
                },
                span,
            ));
        }
        WorkMessage::Active {
            runs, scheduled, ..
        } => {
            let (lost, stale): (Vec<RunId>, Vec<(RunId, Arc<RunHandle>)>) = {
                let mine = agent.runs.lock().unwrap_or_else(|e| e.into_inner());
                // Everything here came before this stream: what the control
                // plane no longer gives this node (lost while it was cut
                // off, and retried elsewhere) must stop, not run on beside
                // the retry.
                let stale = match &scheduled {
                    Some(scheduled) => mine
                        .iter()
                        .filter(|(id, _)| !runs.contains(id) && !scheduled.contains(id))
                        .map(|(id, h)| (*id, h.clone()))
                        .collect(),
                    None => Vec::new(),
                };
                let lost = runs.into_iter().filter(|r| !mine.contains_key(r)).collect();
                (lost, stale)
            };
            for (id, h) in stale {
                tracing::warn!(run = %id, "the control plane no longer gives this node the run; stopping it");
                tokio::task::spawn_blocking(move || h.cancel());
            }
            for id in lost {
                let agent = agent.clone();
                tokio::spawn(async move {
                    // Its process went with an earlier node process (whose
                    // runners this one destroyed at start): the run is lost,
                    // not failed, and the control plane retries it at once
                    // while attempts remain.
                    tracing::warn!(run = %id, "the control plane has a run this node does not know; reporting it lost");
                    let error = "the node restarted while the run was active".to_owned();
                    agent.report(id, None, NodeReport::Lost { error }).await;
                });
            }
        }
        WorkMessage::Cancel { run, attempt } => {
            let h = agent
                .runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&run)
                .filter(|h| attempt.is_none_or(|a| a == h.attempt))
                .cloned();
            if let Some(h) = h {
                tokio::task::spawn_blocking(move || h.cancel());
            }
        }
        WorkMessage::Keepalive => {}
        WorkMessage::PullPlan { pulls, keep } => agent.prepull.set_plan(pulls, keep),
        WorkMessage::Prewarm {
            deployment,
            key,
            image,
            resources,
            recycle_key,
            readonly_rootfs,
            count,
        } => {
            let order = PrewarmOrder {
                key,
                image,
                shape: shape_of(&resources, readonly_rootfs),
                // The scope the deployment's runs recycle in, so that
                // they find these runners.
                scope: ember_control::model::recycle_scope(
                    Some(&deployment),
                    recycle_key.as_deref(),
                ),
                count,
            };
            spawn_prewarm(agent, deployment, order);
        }
    }
}
