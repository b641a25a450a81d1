//! The submit batcher: `POST /v1/runs` hands its spec here and waits;
//! [`submit_loop`] commits every submit waiting in one transaction.

use ember_control::StoreError;
use ember_control::model::RunSpec;
use ember_control::store::Submitted;
use tokio::sync::mpsc;

use super::Shared;

/// A submit handed to [`submit_loop`], with where its answer goes.
pub(super) type PendingSubmit = (
    RunSpec,
    tokio::sync::oneshot::Sender<Result<Submitted, StoreError>>,
);

/// The most submits committed in one transaction.
const SUBMIT_BATCH: usize = 256;

/// Group commit for submits: takes every submit waiting, stores them in
/// one transaction (one fsync), answers each, wakes the dispatcher, and
/// goes again. A lone submit is a batch of one; under a burst the batches
/// grow while the previous one commits, so the database sees a few
/// transactions instead of one per run, and the dispatcher's claims and
/// the nodes' reports are not queued behind hundreds of them.
pub(super) async fn submit_loop(s: Shared, mut rx: mpsc::UnboundedReceiver<PendingSubmit>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < SUBMIT_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (specs, answers): (Vec<RunSpec>, Vec<_>) = batch.into_iter().unzip();
        let store = s.store.clone();
        let results = tokio::task::spawn_blocking(move || store.submit_runs(&specs))
            .await
            .map_err(|e| StoreError::Backend(format!("submit task failed: {e}").into()))
            .and_then(|r| r);
        match results {
            Ok(results) => {
                let created = results
                    .iter()
                    .filter(|r| r.as_ref().is_ok_and(|x| x.created))
                    .count();
                s.metrics.submitted(created);
                if created > 0 {
                    s.wake.notify_one();
                }
                for (tx, r) in answers.into_iter().zip(results) {
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %ember_error::chain(&e), runs = answers.len(), "storing submits failed");
                let msg = ember_error::chain(&e).to_string();
                for tx in answers {
                    let _ = tx.send(Err(StoreError::Backend(msg.clone().into())));
                }
            }
        }
    }
}
