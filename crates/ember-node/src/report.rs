//! Reports (`POST /v1/nodes/{id}/events`): how each run goes, through the
//! node's one reporter.
//!
//! Each run hands its reports to the reporter in order and waits until
//! they are through, so what it sends next (output, later reports) reaches
//! the control plane after them. The reporter posts whatever is queued as
//! one request while its previous request is in flight: at low load a
//! report goes out at once; under a burst the reports of many runs share
//! one request and one store transaction.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ember_api::client::ClientError;
use ember_api::wire::RunReports;
use ember_control::model::{NodeReport, RunId};
use tokio::sync::{mpsc, oneshot};

use crate::agent::NodeAgent;

/// How many times a run event is sent while the control plane is
/// unreachable (one second apart), so a control-plane restart loses none.
const REPORT_ATTEMPTS: u32 = 60;

impl NodeAgent {
    /// Whether the reporter has a request out now: a sign of load, and
    /// that reports queued now go out only after it.
    pub(crate) fn reporter_busy(&self) -> bool {
        self.reporting.load(Ordering::Relaxed)
    }

    /// Reports on `run`; `attempt` (the assignment's `attempts`) fences
    /// the report against a later attempt of the same run.
    pub(crate) async fn report(&self, run: RunId, attempt: Option<u32>, r: NodeReport) {
        self.report_all(run, attempt, vec![(r, Instant::now())])
            .await;
    }

    /// Hands `reports` (in order) to the reporter and waits until they are
    /// through (applied, refused, or given up on), so what the caller sends
    /// next reaches the control plane after them.
    pub(crate) async fn report_all(
        &self,
        run: RunId,
        attempt: Option<u32>,
        reports: Vec<(NodeReport, Instant)>,
    ) {
        tracing::debug!(run = %run, ?reports, "reporting");
        let (done, through) = oneshot::channel();
        let (reports, at): (Vec<_>, Vec<_>) = reports.into_iter().unzip();
        let job = ReportJob {
            reports: RunReports {
                attempt,
                ..RunReports::new(run, reports)
            },
            at,
            done,
        };
        if self.reporter.send(job).is_ok() {
            let _ = through.await;
        }
    }

    /// Posts one batch of reports, retrying while the control plane is
    /// unreachable: a control plane that is restarting must still hear how
    /// the runs went, or they would stay active forever. An answer (say a
    /// run cancelled or reassigned meanwhile) is final.
    async fn post_reports(&self, batch: &[RunReports]) {
        for attempt in 0..REPORT_ATTEMPTS {
            match self.client.report_batch(&self.cfg.id, batch).await {
                Ok(answer) => {
                    for r in answer.results {
                        if let Some(e) = r.error {
                            tracing::debug!(run = %r.run, error = %e.message, "report refused");
                        }
                    }
                    return;
                }
                Err(e @ ClientError::Http { .. }) if attempt + 1 < REPORT_ATTEMPTS => {
                    tracing::warn!(runs = batch.len(), error = %ember_error::chain(&e), "report failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::warn!(runs = batch.len(), error = %ember_error::chain(&e), "reports refused");
                    return;
                }
            }
        }
    }
}

/// One run's reports queued for the reporter, and whom to tell when they
/// are through.
pub(crate) struct ReportJob {
    reports: RunReports,
    /// When each report happened, for its age at sending.
    at: Vec<Instant>,
    done: oneshot::Sender<()>,
}

impl ReportJob {
    /// The reports, dated relative to now.
    fn dated(self) -> (RunReports, oneshot::Sender<()>) {
        let mut reports = self.reports;
        let ages: Vec<u64> = self
            .at
            .iter()
            .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX))
            .collect();
        if ages.iter().any(|&a| a > 0) {
            reports.ages_ms = ages;
        }
        (reports, self.done)
    }
}

/// Most runs' reports in one request.
const REPORT_BATCH: usize = 256;

/// The node's one reporter: posts whatever reports are queued as one
/// request, one request at a time. At low load that is a request per
/// report, sent at once; under a burst, the reports of every run that
/// moved while a request was in flight share the next one (and its
/// transaction in the store), which is what keeps the control plane's
/// work per run small.
pub(crate) async fn report_loop(agent: Arc<NodeAgent>, mut rx: mpsc::UnboundedReceiver<ReportJob>) {
    let (mut batch, mut waiters) = (Vec::new(), Vec::new());
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(job) = next {
            let (reports, done) = job.dated();
            batch.push(reports);
            waiters.push(done);
            next = if batch.len() < REPORT_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        agent.reporting.store(true, Ordering::Relaxed);
        agent.post_reports(&batch).await;
        agent.reporting.store(false, Ordering::Relaxed);
        batch.clear();
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}
