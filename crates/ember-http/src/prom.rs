//! The Prometheus text exposition format (version 0.0.4), written by hand
//! for `ember control` and `ember node`: a few counters, gauges and
//! histograms do not justify an exporter crate and its dependencies.
//!
//! [`Text`] writes metric families (`# HELP`, `# TYPE`, then samples);
//! [`Histogram`] is a lock-free histogram with fixed buckets that renders
//! itself as `_bucket{le=...}`, `_sum` and `_count` samples.
//!
//! ```
//! use ember_http::prom::{Histogram, Text, START_BUCKETS};
//! let h = Histogram::new(START_BUCKETS);
//! h.observe(0.012);
//! let mut t = Text::new();
//! t.family("ember_runs_total", "counter", "Runs.");
//! t.sample("ember_runs_total", &[("outcome", "succeeded")], 3.0);
//! t.family("ember_start_seconds", "histogram", "Start latency.");
//! h.render(&mut t, "ember_start_seconds", &[("phase", "queue")]);
//! assert!(t.finish().contains("ember_start_seconds_bucket{phase=\"queue\",le=\"0.025\"} 1"));
//! ```

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) for start-latency histograms: from a warm start
/// (a few milliseconds) to a cold pull of a large image (a minute).
pub const START_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A text exposition being written.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

impl Text {
    /// An empty exposition.
    pub fn new() -> Text {
        Text::default()
    }

    /// Starts a metric family: its help line and type (`counter`,
    /// `gauge`, `histogram`). Its samples follow.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample line: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// The exposition's text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the format wants it: backslash, quote and newline
/// escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value: integers without a fraction, infinities as `+Inf`.
fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if v.is_nan() {
        "NaN".to_owned()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A histogram with fixed upper bounds, updated lock-free. Buckets are
/// stored non-cumulatively and summed when rendered.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus the `+Inf` bucket.
    counts: Vec<AtomicU64>,
    /// The sum of observations, in microunits (integer, so it can be an
    /// atomic).
    sum_micros: AtomicU64,
}

impl Histogram {
    /// An empty histogram with these (ascending) upper bounds.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The cumulative count of each bucket, `+Inf` last, with its bound.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        self.counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                acc += c.load(Ordering::Relaxed);
                (self.bounds.get(i).copied().unwrap_or(f64::INFINITY), acc)
            })
            .collect()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples of `name` (whose
    /// family the caller has started) with `labels` on each.
    pub fn render(&self, t: &mut Text, name: &str, labels: &[(&str, &str)]) {
        let bucket = format!("{name}_bucket");
        let mut total = 0;
        for (le, n) in self.buckets() {
            let le = number(le);
            let mut l = labels.to_vec();
            l.push(("le", &le));
            t.sample(&bucket, &l, n as f64);
            total = n;
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        t.sample(&format!("{name}_sum"), labels, sum);
        t.sample(&format!("{name}_count"), labels, total as f64);
    }
}

/// Writes a server's connection figures ([`crate::Stats`]) as
/// `{prefix}_connections` (open now), `{prefix}_connections_accepted_total`
/// and `{prefix}_connections_closed_total{reason}`.
pub fn connections(t: &mut Text, prefix: &str, stats: &crate::Stats) {
    use crate::Stats;
    let open = format!("{prefix}_connections");
    t.single(
        &open,
        "gauge",
        "Client connections open.",
        Stats::get(&stats.open) as f64,
    );
    let accepted = format!("{prefix}_connections_accepted_total");
    t.single(
        &accepted,
        "counter",
        "Client connections accepted.",
        Stats::get(&stats.accepted) as f64,
    );
    let closed = format!("{prefix}_connections_closed_total");
    t.family(
        &closed,
        "counter",
        "Client connections the server closed or refused, by reason.",
    );
    for (reason, c) in [
        ("header_timeout", &stats.header_timeouts),
        ("idle_timeout", &stats.idle_timeouts),
        ("stalled", &stats.stalled),
        ("evicted", &stats.evicted),
        ("refused", &stats.refused),
    ] {
        t.sample(&closed, &[("reason", reason)], Stats::get(c) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_at_inf() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 5.0] {
            h.observe(v);
        }
        assert_eq!(h.buckets(), vec![(0.1, 1), (1.0, 3), (f64::INFINITY, 4)]);
        let mut t = Text::new();
        t.family("x_seconds", "histogram", "X.");
        h.render(&mut t, "x_seconds", &[("a", "q\"b")]);
        let s = t.finish();
        assert!(
            s.contains("x_seconds_bucket{a=\"q\\\"b\",le=\"+Inf\"} 4\n"),
            "{s}"
        );
        assert!(s.contains("x_seconds_sum{a=\"q\\\"b\"} 6.25\n"), "{s}");
        assert!(s.contains("x_seconds_count{a=\"q\\\"b\"} 4\n"), "{s}");
    }
}
