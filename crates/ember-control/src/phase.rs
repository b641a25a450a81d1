//! The one definition of each phase of a run's start, shared by
//! `ember bench burst`, `ember runs --stats`, the control plane's
//! `/metrics` and its dashboard, so that "queue time" means the same thing
//! wherever Ember shows it.
//!
//! The phases follow the timestamps of [`StartTimes`]: a run is *queued*
//! (submit, or re-queue after a loss), *claimed* by a scheduler (the queue
//! ends, placement begins), *scheduled* on a node, then the node has the
//! *image*, a *runner*, its declared directory caches are restored
//! (*cache_restore*, only for runs that declare caches), and the
//! *process* starts. A warm hand-off (a node's
//! idle runner takes a queued run directly) claims and schedules at the same
//! instant, so its placement is 0.

use crate::model::{Millis, StartTimes};

/// `b - a` when both are known (saturating: clocks of replicas may differ).
pub fn span(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    Some(b?.saturating_sub(a?))
}

/// One phase of a run's start: a name, what it spans, and how to read it
/// from the run's timestamps.
#[derive(Clone, Copy)]
pub struct Phase {
    /// Short name (`queue`), used as a column and a JSON key.
    pub name: &'static str,
    /// From which timestamp to which, in words.
    pub spans: &'static str,
    /// The phase's duration, when both ends are known.
    pub of: fn(&StartTimes) -> Option<Millis>,
}

impl std::fmt::Debug for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Phase")
            .field("name", &self.name)
            .field("spans", &self.spans)
            .finish()
    }
}

/// Queued → claimed by a scheduler: the wait for the scheduler's
/// attention. Runs stored before `claimed` existed end it at `scheduled`
/// (placement then counts in the queue, as it did).
pub const QUEUE: Phase = Phase {
    name: "queue",
    spans: "submit → picked up by the scheduler",
    of: |t| span(t.queued, t.claimed.or(t.scheduled)),
};

/// Claimed → assigned to a node: choosing the node (0 for a warm
/// hand-off, which claims and schedules at once).
pub const PLACEMENT: Phase = Phase {
    name: "placement",
    spans: "→ assigned to a node; 0 for a warm hand-off",
    of: |t| span(t.claimed, t.scheduled),
};

/// Assigned → the node has the image's layers.
pub const IMAGE: Phase = Phase {
    name: "image",
    spans: "→ image on the node",
    of: |t| span(t.scheduled, t.image_ready),
};

/// Image ready → a snapshot run's copy restored from the node's
/// checkpoint (absent for other runs and for a snapshot run that started
/// fresh: its start-up then counts in the runner phase).
pub const RESTORE: Phase = Phase {
    name: "restore",
    spans: "→ snapshot restored (snapshot runs)",
    of: |t| span(t.image_ready, t.snapshot_restored),
};

/// Image ready (or the snapshot restored) → a runner (warm, new or
/// restored, its agent connected) ready.
pub const RUNNER: Phase = Phase {
    name: "runner",
    spans: "→ runner ready",
    of: |t| span(t.snapshot_restored.or(t.image_ready), t.runner_ready),
};

/// Runner ready → the run's declared directory caches restored into it;
/// unknown (not 0) for a run that declares none, so its statistics are
/// those of the runs that restore caches.
pub const CACHE_RESTORE: Phase = Phase {
    name: "cache_restore",
    spans: "→ declared caches restored (runs with caches only)",
    of: |t| span(t.runner_ready, t.caches_restored),
};

/// Runner ready (or caches restored) → the process started.
pub const PROCESS: Phase = Phase {
    name: "process",
    spans: "→ process started",
    of: |t| span(t.caches_restored.or(t.runner_ready), t.process_started),
};

/// Assigned → process started: the node's whole part (image + runner +
/// process).
pub const NODE: Phase = Phase {
    name: "node",
    spans: "assigned to a node → process started",
    of: |t| span(t.scheduled, t.process_started),
};

/// Submit → process started: the whole start.
pub const TOTAL: Phase = Phase {
    name: "total",
    spans: "submit → process started",
    of: |t| span(t.queued, t.process_started),
};

/// The phases `ember runs --stats` reports, in order: consecutive, so
/// they add up to [`TOTAL`] (which is last); [`RESTORE`] only for the
/// runs restored from a snapshot, [`CACHE_RESTORE`] only for runs that
/// declare directory caches.
pub const PHASES: [Phase; 8] = [
    QUEUE,
    PLACEMENT,
    IMAGE,
    RESTORE,
    RUNNER,
    CACHE_RESTORE,
    PROCESS,
    TOTAL,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn times(q: u64, c: Option<u64>, s: u64, i: u64, r: u64, p: u64) -> StartTimes {
        StartTimes {
            queued: Some(q),
            claimed: c,
            scheduled: Some(s),
            image_ready: Some(i),
            runner_ready: Some(r),
            process_started: Some(p),
            finished: None,
            ..StartTimes::default()
        }
    }

    #[test]
    fn consecutive_phases_add_up_to_the_total() {
        let t = times(100, Some(103), 110, 120, 135, 136);
        let parts: Vec<u64> = PHASES[..7]
            .iter()
            .filter(|p| p.name != RESTORE.name && p.name != CACHE_RESTORE.name)
            .map(|p| (p.of)(&t).expect("known"))
            .collect();
        assert_eq!(parts, vec![3, 7, 10, 15, 1]);
        assert_eq!((TOTAL.of)(&t), Some(parts.iter().sum()));
        // The node's part is image + runner + process.
        assert_eq!((NODE.of)(&t), Some(26));
        // Not a snapshot run: no restore phase.
        assert_eq!((RESTORE.of)(&t), None);
    }

    #[test]
    fn a_restored_run_splits_its_runner_phase_at_the_restore() {
        let mut t = times(100, Some(103), 110, 120, 135, 136);
        t.snapshot_restored = Some(131);
        // Image ready at 120, restored at 131, agent connected at 135.
        assert_eq!(((RESTORE.of)(&t), (RUNNER.of)(&t)), (Some(11), Some(4)));
        let sum: u64 = PHASES[..7].iter().filter_map(|p| (p.of)(&t)).sum();
        assert_eq!(Some(sum), (TOTAL.of)(&t));
    }

    #[test]
    fn cache_restore_sits_between_the_runner_and_the_process() {
        let mut t = times(100, Some(103), 110, 120, 135, 140);
        assert_eq!((CACHE_RESTORE.of)(&t), None, "no caches declared");
        t.caches_restored = Some(138);
        assert_eq!(
            ((RUNNER.of)(&t), (CACHE_RESTORE.of)(&t), (PROCESS.of)(&t)),
            (Some(15), Some(3), Some(2))
        );
        let sum: u64 = PHASES[..7].iter().filter_map(|p| (p.of)(&t)).sum();
        assert_eq!((TOTAL.of)(&t), Some(sum));
    }

    #[test]
    fn queue_ends_at_the_claim_not_the_placement() {
        // Claimed at 103, placed at 110: queue 3, placement 7.
        let t = times(100, Some(103), 110, 110, 110, 110);
        assert_eq!(((QUEUE.of)(&t), (PLACEMENT.of)(&t)), (Some(3), Some(7)));
        // A warm hand-off claims and schedules at once.
        let t = times(100, Some(110), 110, 110, 110, 110);
        assert_eq!(((QUEUE.of)(&t), (PLACEMENT.of)(&t)), (Some(10), Some(0)));
        // A record from before `claimed` existed: the queue runs to the
        // placement, and placement is unknown.
        let t = times(100, None, 110, 110, 110, 110);
        assert_eq!(((QUEUE.of)(&t), (PLACEMENT.of)(&t)), (Some(10), None));
    }
}
