//! Percentiles, loop figures, and the one definition of each phase of a
//! run's start, shared by `ember bench burst` and `ember runs --stats` so
//! that "queue time" means the same thing wherever Ember prints it.
//!
//! The phases follow the timestamps of [`StartTimes`]: a run is *queued*
//! (submit, or re-queue after a loss), *claimed* by a scheduler (the queue
//! ends, placement begins), *scheduled* on a node, then the node has the
//! *image*, a *runner*, and the *process* starts. A warm hand-off (a node's
//! idle runner takes a queued run directly) claims and schedules at the same
//! instant, so its placement is 0.

use ember_control::model::{Millis, Run, StartTimes};
use std::time::Duration;

/// The `q` quantile (0..=1) of sorted values by nearest rank; the default
/// (zero) for none. One rule for every percentile Ember prints.
pub fn quantile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `b - a` when both are known (saturating: clocks of replicas may differ).
pub fn span(a: Option<Millis>, b: Option<Millis>) -> Option<Millis> {
    Some(b?.saturating_sub(a?))
}

/// A duration in milliseconds, fractional.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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

/// Image ready → a runner (warm or new) ready.
pub const RUNNER: Phase = Phase {
    name: "runner",
    spans: "→ runner ready",
    of: |t| span(t.image_ready, t.runner_ready),
};

/// Runner ready → the process started.
pub const PROCESS: Phase = Phase {
    name: "process",
    spans: "→ process started",
    of: |t| span(t.runner_ready, t.process_started),
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
/// they add up to [`TOTAL`] (which is last).
pub const PHASES: [Phase; 6] = [QUEUE, PLACEMENT, IMAGE, RUNNER, PROCESS, TOTAL];

/// Durations of some phases over many runs. Only runs whose process
/// started count, so every phase is over the same runs.
#[derive(Debug, Clone)]
pub struct PhaseSamples {
    phases: Vec<Phase>,
    values: Vec<Vec<Millis>>,
    started: usize,
}

impl PhaseSamples {
    /// Empty samples of `phases`.
    pub fn new(phases: &[Phase]) -> PhaseSamples {
        PhaseSamples {
            phases: phases.to_vec(),
            values: vec![Vec::new(); phases.len()],
            started: 0,
        }
    }

    /// Adds the runs whose process started.
    pub fn add<'a>(&mut self, runs: impl IntoIterator<Item = &'a Run>) {
        for r in runs {
            if r.times.process_started.is_none() {
                continue;
            }
            self.started += 1;
            for (v, p) in self.values.iter_mut().zip(&self.phases) {
                v.extend((p.of)(&r.times));
            }
        }
    }

    /// Runs counted (their process started).
    pub fn started(&self) -> usize {
        self.started
    }

    /// Each phase with its percentiles, in the order given to `new`.
    pub fn percentiles(&self) -> Vec<(Phase, Percentiles)> {
        self.phases
            .iter()
            .zip(&self.values)
            .map(|(p, v)| {
                let mut v = v.clone();
                v.sort_unstable();
                (*p, Percentiles::of_sorted(&v))
            })
            .collect()
    }

    /// The percentiles of the phase named `name`.
    pub fn get(&self, name: &str) -> Percentiles {
        self.phases
            .iter()
            .position(|p| p.name == name)
            .map(|i| {
                let mut v = self.values[i].clone();
                v.sort_unstable();
                Percentiles::of_sorted(&v)
            })
            .unwrap_or_default()
    }
}

/// Percentiles of one phase, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: Millis,
    /// 90th percentile.
    pub p90_ms: Millis,
    /// 99th percentile.
    pub p99_ms: Millis,
    /// Largest.
    pub max_ms: Millis,
    /// Values counted.
    pub n: usize,
}

impl Percentiles {
    /// Percentiles of sorted values.
    pub fn of_sorted(v: &[Millis]) -> Percentiles {
        Percentiles {
            p50_ms: quantile(v, 0.5),
            p90_ms: quantile(v, 0.9),
            p99_ms: quantile(v, 0.99),
            max_ms: v.last().copied().unwrap_or(0),
            n: v.len(),
        }
    }
}

/// Latency figures of one loop of actions, in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoopStats {
    /// Actions timed.
    pub n: usize,
    /// Actions per second of the loop's wall time.
    pub actions_per_s: f64,
    /// Median action.
    pub p50_ms: f64,
    /// 99th percentile action.
    pub p99_ms: f64,
    /// Mean action.
    pub mean_ms: f64,
}

/// The figures of `samples` (one per action) taken over `wall`.
pub fn loop_stats(mut samples: Vec<Duration>, wall: Duration) -> LoopStats {
    samples.sort();
    let n = samples.len();
    let total: Duration = samples.iter().sum();
    LoopStats {
        n,
        actions_per_s: n as f64 / wall.as_secs_f64().max(1e-9),
        p50_ms: ms(quantile(&samples, 0.5)),
        p99_ms: ms(quantile(&samples, 0.99)),
        mean_ms: if n == 0 { 0.0 } else { ms(total) / n as f64 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_nearest_ranks() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(51));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile::<Duration>(&[], 0.5), Duration::ZERO);
        let s = loop_stats(v, Duration::from_secs(2));
        assert_eq!(s.n, 100);
        assert!((s.actions_per_s - 50.0).abs() < 1e-9);
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
    }

    fn times(q: u64, c: Option<u64>, s: u64, i: u64, r: u64, p: u64) -> StartTimes {
        StartTimes {
            queued: Some(q),
            claimed: c,
            scheduled: Some(s),
            image_ready: Some(i),
            runner_ready: Some(r),
            process_started: Some(p),
            finished: None,
        }
    }

    #[test]
    fn consecutive_phases_add_up_to_the_total() {
        let t = times(100, Some(103), 110, 120, 135, 136);
        let parts: Vec<u64> = PHASES[..5]
            .iter()
            .map(|p| (p.of)(&t).expect("known"))
            .collect();
        assert_eq!(parts, vec![3, 7, 10, 15, 1]);
        assert_eq!((TOTAL.of)(&t), Some(parts.iter().sum()));
        // The node's part is image + runner + process.
        assert_eq!((NODE.of)(&t), Some(26));
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
