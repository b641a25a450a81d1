//! Reports (`POST /v1/nodes/{id}/events`): how each run goes, through the
//! node's one reporter.
//!
//! Each run hands its reports to the reporter in order and waits until
//! they are through, so what it sends next (output, later reports) reaches
//! the control plane after them. The reporter posts whatever is queued as
//! one request while its previous request is in flight: at low load a
//! report goes out at once; under a burst the reports of many runs share
//! one request and one store transaction. While other runs hold slots on
//! the node, it waits up to a millisecond for their reports too, since
//! under a burst runs end close together.

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

    /// Runs holding one of the node's slots now (a run holds its slot
    /// until its last report is through; runs waiting for a slot report
    /// nothing meanwhile).
    fn runs_in_flight(&self) -> usize {
        (self.cfg.slots.max(1) as usize).saturating_sub(self.slots.available_permits())
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

/// How long the reporter waits, while other runs execute on the node, for
/// their reports to share its next request. Under a burst a warm run ends
/// every few hundred microseconds on this node, so a request carries
/// several runs' reports instead of one (each request is node CPU, and a
/// transaction in the control plane's store); a run alone on the node is
/// reported at once.
const COALESCE: Duration = Duration::from_millis(1);

/// The node's one reporter: posts whatever reports are queued as one
/// request, one request at a time. At low load that is a request per
/// report, sent at once; under a burst, the reports of every run that
/// moved while a request was in flight share the next one (and its
/// transaction in the store), which is what keeps the control plane's
/// work per run small. While other runs hold slots, it also waits up to
/// [`COALESCE`] for their reports ([`gather`]).
pub(crate) async fn report_loop(agent: Arc<NodeAgent>, mut rx: mpsc::UnboundedReceiver<ReportJob>) {
    let (mut batch, mut waiters) = (Vec::new(), Vec::new());
    let mut jobs = Vec::new();
    while let Some(first) = rx.recv().await {
        gather(&mut rx, first, &mut jobs, || agent.runs_in_flight()).await;
        // Dated now, as they are sent: the wait is part of their age.
        for job in jobs.drain(..) {
            let (reports, done) = job.dated();
            batch.push(reports);
            waiters.push(done);
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

/// Collects the next request's jobs into `jobs`: `first`, whatever else is
/// queued, and, while more runs hold slots (`in_flight`) than have a job
/// in it, what arrives within [`COALESCE`] of `first`. At most
/// [`REPORT_BATCH`].
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<ReportJob>,
    first: ReportJob,
    jobs: &mut Vec<ReportJob>,
    in_flight: impl Fn() -> usize,
) {
    let until = tokio::time::Instant::now() + COALESCE;
    jobs.push(first);
    while jobs.len() < REPORT_BATCH {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    // Another run is executing here: it likely ends within the window,
    // and its report shares this request. A lone run's report goes at once.
    while jobs.len() < REPORT_BATCH && in_flight() > jobs.len() {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(job)) => jobs.push(job),
            Ok(None) | Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(run: i64) -> ReportJob {
        let (done, _) = oneshot::channel();
        ReportJob {
            reports: RunReports::new(RunId(run), vec![NodeReport::Started]),
            at: vec![Instant::now()],
            done,
        }
    }

    /// Polls `f` once: `Some` if it finished without waiting.
    fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn a_lone_run_is_reported_without_a_wait() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut jobs = Vec::new();
        // Finished on its first poll: no timer, no wait.
        assert!(poll_once(gather(&mut rx, job(1), &mut jobs, || 1)).is_some());
        assert_eq!(jobs.len(), 1);
        // Queued jobs go along, without a wait either once every run in
        // flight has one in the batch.
        jobs.clear();
        tx.send(job(2)).expect("send");
        assert!(poll_once(gather(&mut rx, job(1), &mut jobs, || 2)).is_some());
        assert_eq!(jobs.len(), 2);
    }

    #[tokio::test]
    async fn reports_of_runs_in_flight_share_a_request_within_the_window() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut jobs = Vec::new();
        // Three runs hold slots and one reports: the reporter waits for
        // the others, and a report arriving meanwhile joins the batch.
        let t0 = Instant::now();
        {
            let mut waiting = std::pin::pin!(gather(&mut rx, job(1), &mut jobs, || 3));
            assert!(poll_once(waiting.as_mut()).is_none(), "it waits");
            tx.send(job(2)).expect("send");
            waiting.await;
        }
        assert_eq!(jobs.len(), 2);
        // The third never reported: the window ran out, and no more.
        assert!(t0.elapsed() < Duration::from_secs(5));
        // Nothing arrives: the batch leaves at the window's end (never
        // before: tokio's timers do not fire early).
        jobs.clear();
        let t1 = Instant::now();
        gather(&mut rx, job(4), &mut jobs, || 3).await;
        assert_eq!(jobs.len(), 1);
        assert!(t1.elapsed() >= COALESCE, "{:?}", t1.elapsed());
    }
}
