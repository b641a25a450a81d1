//! Percentiles, loop figures, and samples of the phases of a run's start.
//! The phases themselves are defined once, in [`ember_control::phase`]
//! (re-exported here), so that the control plane's `/metrics` and this
//! crate agree on what "queue time" is.

use ember_control::model::{Millis, Run};
pub use ember_control::phase::{
    IMAGE, NODE, PHASES, PLACEMENT, PROCESS, Phase, QUEUE, RESTORE, RUNNER, TOTAL, span,
};
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

/// A duration in milliseconds, fractional.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

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
}
