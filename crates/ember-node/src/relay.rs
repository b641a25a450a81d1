//! A run's relay: what its blocking executor tells the async side (reports
//! and output, in order), and how the run's task sends it on (`report`,
//! `logs`) in that order.
//!
//! Progress (image ready, runner ready, process started) is queued without
//! waking the run's task: a warm run's progress is followed within
//! milliseconds by its exit, and the task sends them together. Waking the
//! task for each one cost the node a thread wake-up and a context switch
//! per report, a good part of its CPU per run under a burst. While the
//! task holds progress, only a report that is not progress, output, or the
//! end of the executor wakes it (or its hold running out); while it holds
//! nothing, any event wakes it, as before.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_api::wire::LogStream;
use ember_control::model::{NodeReport, RunId};
use tokio::sync::Notify;

use crate::agent::NodeAgent;

/// What the blocking executor tells the async side, in order.
pub(crate) enum Event {
    /// A report, and when it happened.
    Report(NodeReport, Instant),
    Output(LogStream, Vec<u8>),
}

impl Event {
    pub(crate) fn report(r: NodeReport) -> Event {
        Event::Report(r, Instant::now())
    }

    /// Image ready, snapshot restored (or not), runner ready, caches
    /// restored, process started: progress worth a
    /// request of its own only when the next report does not follow at
    /// once.
    fn is_milestone(&self) -> bool {
        matches!(
            self,
            Event::Report(
                NodeReport::ImageReady
                    | NodeReport::Snapshot { .. }
                    | NodeReport::RunnerReady
                    | NodeReport::CachesRestored { .. }
                    | NodeReport::Started,
                _
            )
        )
    }
}

/// How long a run's progress reports wait for the next report to travel
/// with. On a warm start the process starts well within it, and a short
/// one exits within it too, so such a run costs the control plane one
/// report row update instead of two or three; a cold runner (hundreds of
/// ms) or a longer process still shows its progress this much later. The
/// reports keep their own times either way, and output is never held.
const MILESTONE_HOLD: Duration = Duration::from_millis(5);

/// How long progress reports wait in all when the reporter is busy at the
/// end of [`MILESTONE_HOLD`] (a burst): under load a warm run's process
/// often exits only after 5 ms, and its progress would otherwise go in a
/// request of its own, a second one per run.
const MILESTONE_HOLD_BUSY: Duration = Duration::from_millis(50);

/// The events queued so far, and whether the executor is done.
#[derive(Default)]
struct Queue {
    events: Vec<Event>,
    closed: bool,
    /// The task waits with nothing held: progress wakes it too (and then
    /// starts its hold), so no progress waits for a later report.
    waiting: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Notified for every event that is not progress, for progress when
    /// the task waits with nothing held, and at the end.
    wake: Notify,
}

/// The executor's end: sends events in order; dropping it ends the relay.
pub(crate) struct EventTx(Arc<Shared>);

/// The run task's end ([`relay`]).
pub(crate) struct EventRx(Arc<Shared>);

/// A new relay channel.
pub(crate) fn channel() -> (EventTx, EventRx) {
    let shared = Arc::new(Shared::default());
    (EventTx(shared.clone()), EventRx(shared))
}

impl EventTx {
    /// Queues `ev`; wakes the run's task unless it is progress that the
    /// task's hold will pick up. Never fails (the `Result` keeps the shape
    /// of a channel's send).
    pub(crate) fn send(&self, ev: Event) -> Result<(), std::convert::Infallible> {
        let wake = {
            let mut q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
            let wake = q.waiting || !ev.is_milestone();
            q.waiting = false;
            q.events.push(ev);
            wake
        };
        if wake {
            self.0.wake.notify_one();
        }
        Ok(())
    }
}

impl Drop for EventTx {
    fn drop(&mut self) {
        self.0
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.0.wake.notify_one();
    }
}

impl EventRx {
    /// Moves what is queued to `pending`; `true` once the executor is done
    /// and nothing more will come. With `idle` (the task is about to wait
    /// with nothing held), the next event wakes the task whatever it is.
    fn take(&self, pending: &mut Vec<Event>, idle: bool) -> bool {
        let mut q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        pending.append(&mut q.events);
        q.waiting = idle && pending.is_empty() && !q.closed;
        q.closed
    }

    /// Adds to `pending` what is queued by `until`, returning early once
    /// a report that is not progress, output or the end arrived; `true`
    /// in that case.
    async fn hold(&self, pending: &mut Vec<Event>, until: tokio::time::Instant) -> bool {
        loop {
            let woken = tokio::time::timeout_at(until, self.0.wake.notified())
                .await
                .is_ok();
            let closed = self.take(pending, false);
            if closed || pending.iter().any(|e| !e.is_milestone()) {
                return true;
            }
            if !woken {
                return false;
            }
        }
    }
}

/// Sends `rx`'s events on for `run` (`attempt`) until the executor is
/// done: in order, so every byte of output is stored before the exit is
/// reported (log followers stop at the final state). Returns whether the
/// last event was a final report (the executor then ran to its end).
pub(crate) async fn relay(
    agent: &Arc<NodeAgent>,
    run: RunId,
    attempt: Option<u32>,
    rx: EventRx,
) -> bool {
    let mut pending = Vec::new();
    let mut finished = false;
    loop {
        let closed = rx.take(&mut pending, true);
        if pending.is_empty() {
            if closed {
                return finished;
            }
            rx.0.wake.notified().await;
            continue;
        }
        if !closed && pending.iter().all(Event::is_milestone) {
            let start = tokio::time::Instant::now();
            let done = rx.hold(&mut pending, start + MILESTONE_HOLD).await;
            // Still only progress, and the reporter has a request out: the
            // node is busy, and this progress would cost a request of its
            // own (each one is node CPU taken from the runs). It waits for
            // the run's next report a while longer.
            if !done && agent.reporter_busy() {
                rx.hold(&mut pending, start + MILESTONE_HOLD_BUSY).await;
            }
        }
        let mut reports = Vec::new();
        for ev in pending.drain(..) {
            match ev {
                Event::Report(r, at) => {
                    finished = matches!(r, NodeReport::Exited { .. } | NodeReport::Failed { .. });
                    reports.push((r, at));
                }
                Event::Output(stream, data) => {
                    finished = false;
                    if !reports.is_empty() {
                        agent
                            .report_all(run, attempt, std::mem::take(&mut reports))
                            .await;
                    }
                    agent.ship_output(run, stream, data).await;
                }
            }
        }
        if !reports.is_empty() {
            agent.report_all(run, attempt, reports).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited() -> Event {
        Event::report(NodeReport::Exited {
            code: 0,
            runner_idle: true,
        })
    }

    #[tokio::test]
    async fn progress_wakes_an_idle_task_but_waits_in_a_hold_for_the_exit() {
        let (tx, rx) = channel();
        let mut pending = Vec::new();
        // Nothing held: the task waits, and progress alone wakes it (a
        // long run's start must not wait for its exit).
        assert!(!rx.take(&mut pending, true));
        tx.send(Event::report(NodeReport::Started)).expect("send");
        tokio::time::timeout(Duration::from_secs(30), rx.0.wake.notified())
            .await
            .expect("progress woke the idle task");
        assert!(!rx.take(&mut pending, false));
        assert_eq!(pending.len(), 1);

        // Holding: more progress is queued quietly, and the hold ends
        // with the exit (long before its limit), all of it in order.
        tx.send(Event::report(NodeReport::RunnerReady))
            .expect("send");
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(exited()).expect("send");
            tx
        });
        let until = tokio::time::Instant::now() + Duration::from_secs(3600);
        assert!(
            rx.hold(&mut pending, until).await,
            "the exit ended the hold"
        );
        assert_eq!(pending.len(), 3);
        assert!(matches!(
            pending[2],
            Event::Report(NodeReport::Exited { .. }, _)
        ));

        // Dropping the sender ends the relay.
        drop(sender.join().expect("sender thread"));
        pending.clear();
        assert!(rx.take(&mut pending, true));
        assert!(pending.is_empty());
    }

    #[tokio::test]
    async fn a_hold_on_progress_alone_runs_out() {
        let (tx, rx) = channel();
        let mut pending = Vec::new();
        tx.send(Event::report(NodeReport::ImageReady))
            .expect("send");
        rx.take(&mut pending, false);
        let until = tokio::time::Instant::now() + Duration::from_millis(20);
        tx.send(Event::report(NodeReport::RunnerReady))
            .expect("send");
        assert!(!rx.hold(&mut pending, until).await);
        assert_eq!(pending.len(), 2, "the queued progress is taken at the end");
    }
}
