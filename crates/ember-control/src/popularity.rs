//! Launch statistics: how often each image is launched, with time decay.
//!
//! Every launch adds 1 to its image's score, and every score halves each
//! [`Popularity::half_life_ms`], so a score is "launches in about the last
//! half-life", and an image that stops being launched (rebuilt under a new
//! digest, or abandoned) fades without a sweep. Scores are kept as the
//! value at the last update and decayed lazily when read, so recording a
//! launch is O(log images) and nothing runs on a timer.
//!
//! Images are keyed by manifest digest, the identity a run pins: a rebuilt
//! image is a new digest that starts from zero and climbs as launches move
//! to it, which is what a pull plan should follow (the old layers it shares
//! are counted once by the planner, not here). The same type counts
//! launches per deployment when keyed by deployment name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Millis;

/// The default half-life: one day, so yesterday's launches count half and
/// last week's under 1 %.
pub const DEFAULT_HALF_LIFE_MS: Millis = 24 * 3600 * 1000;

/// Scores below this (after decay) are dropped by [`Popularity::prune`]:
/// an image launched once about ten half-lives ago.
const FORGET_BELOW: f64 = 1e-3;

/// One key's decayed launch count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Entry {
    /// The score at `at`.
    score: f64,
    /// When `score` was last brought up to date.
    at: Millis,
}

/// Decayed launch counts by key (an image digest or a deployment name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Popularity {
    /// Time after which a launch counts half.
    pub half_life_ms: Millis,
    entries: BTreeMap<String, Entry>,
}

impl Default for Popularity {
    fn default() -> Self {
        Popularity::new(DEFAULT_HALF_LIFE_MS)
    }
}

impl Popularity {
    /// Empty statistics with the given half-life (at least 1 ms).
    pub fn new(half_life_ms: Millis) -> Self {
        Popularity {
            half_life_ms: half_life_ms.max(1),
            entries: BTreeMap::new(),
        }
    }

    fn decay(&self, e: &Entry, now: Millis) -> f64 {
        // A clock that went backwards does not inflate a score.
        let dt = now.saturating_sub(e.at) as f64;
        e.score * (-(dt / self.half_life_ms as f64) * std::f64::consts::LN_2).exp()
    }

    /// Counts one launch of `key` at `now`.
    pub fn record(&mut self, key: &str, now: Millis) {
        self.record_weighted(key, 1.0, now);
    }

    /// Counts `weight` launches of `key` at `now` (used when replaying
    /// stored runs in bulk).
    pub fn record_weighted(&mut self, key: &str, weight: f64, now: Millis) {
        let current = self.entries.get(key).map_or(0.0, |e| self.decay(e, now));
        let at = self.entries.get(key).map_or(now, |e| e.at.max(now));
        self.entries.insert(
            key.to_owned(),
            Entry {
                score: current + weight,
                at,
            },
        );
    }

    /// `key`'s decayed launch count at `now` (0 for a key never launched).
    pub fn score(&self, key: &str, now: Millis) -> f64 {
        self.entries.get(key).map_or(0.0, |e| self.decay(e, now))
    }

    /// Every key with its score at `now`, most launched first; ties by
    /// key so the order is reproducible.
    pub fn ranked(&self, now: Millis) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self
            .entries
            .iter()
            .map(|(k, e)| (k.clone(), self.decay(e, now)))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// Drops keys whose score has decayed to almost nothing, so the table
    /// holds the images of roughly the last ten half-lives.
    pub fn prune(&mut self, now: Millis) {
        let half_life = self.half_life_ms;
        self.entries.retain(|_, e| {
            let dt = now.saturating_sub(e.at) as f64;
            e.score * (-(dt / half_life as f64) * std::f64::consts::LN_2).exp() >= FORGET_BELOW
        });
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Millis = 1000;

    #[test]
    fn a_launch_counts_half_after_one_half_life() {
        let mut p = Popularity::new(H);
        p.record("a", 0);
        assert!((p.score("a", 0) - 1.0).abs() < 1e-9);
        assert!((p.score("a", H) - 0.5).abs() < 1e-9);
        assert!((p.score("a", 2 * H) - 0.25).abs() < 1e-9);
        assert_eq!(p.score("never", 5), 0.0);
    }

    #[test]
    fn launches_accumulate_with_decay() {
        let mut p = Popularity::new(H);
        p.record("a", 0);
        p.record("a", H); // 0.5 + 1
        assert!((p.score("a", H) - 1.5).abs() < 1e-9);
        assert!((p.score("a", 2 * H) - 0.75).abs() < 1e-9);
    }

    #[test]
    fn recent_launches_outrank_old_bursts() {
        let mut p = Popularity::new(H);
        for _ in 0..8 {
            p.record("old", 0);
        }
        p.record("new", 4 * H);
        p.record("new", 4 * H);
        // old: 8 / 16 = 0.5 at 4H; new: 2.
        let ranked = p.ranked(4 * H);
        assert_eq!(ranked[0].0, "new");
        assert_eq!(ranked[1].0, "old");
    }

    #[test]
    fn ties_rank_by_key_and_a_clock_going_back_does_not_inflate() {
        let mut p = Popularity::new(H);
        p.record("b", 10);
        p.record("a", 10);
        let keys: Vec<String> = p.ranked(10).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b"]);
        assert!((p.score("a", 0) - 1.0).abs() < 1e-9);
        p.record("a", 0);
        assert!((p.score("a", 10) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn prune_forgets_only_faded_keys() {
        let mut p = Popularity::new(H);
        p.record("old", 0);
        p.record("new", 20 * H);
        p.prune(20 * H);
        assert_eq!(p.len(), 1);
        assert!(p.score("new", 20 * H) > 0.9);
    }
}
