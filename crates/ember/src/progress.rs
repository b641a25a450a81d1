//! Pull progress: bars on a terminal, plain lines otherwise.

use ember_oci::Digest;
use ember_store::PullProgress;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

/// Draws per-layer bars and a total bar when stderr is a terminal; prints
/// one line per finished layer otherwise (logs and CI stay readable).
pub struct Progress {
    bars: Option<Bars>,
    started: Mutex<HashMap<Digest, (Instant, u64)>>,
    quiet: bool,
}

struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    layers: Mutex<HashMap<Digest, ProgressBar>>,
}

fn short(d: &Digest) -> &str {
    &d.hex()[..12]
}

impl Progress {
    /// Progress for one pull; `quiet` prints nothing at all.
    pub fn new(quiet: bool) -> Progress {
        let bars = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let total = multi.add(ProgressBar::new(0));
            total.set_style(
                ProgressStyle::with_template(
                    "total        [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Bars {
                multi,
                total,
                layers: Mutex::new(HashMap::new()),
            }
        });
        Progress {
            bars,
            started: Mutex::new(HashMap::new()),
            quiet,
        }
    }

    /// Clears bars before the final summary.
    pub fn finish(&self) {
        if let Some(b) = &self.bars {
            b.total.finish_and_clear();
            let _ = b.multi.clear();
        }
    }
}

impl PullProgress for Progress {
    fn resolved(&self, manifest: &Digest, layers: usize) {
        if self.bars.is_none() && !self.quiet {
            eprintln!("resolved {manifest} ({layers} layers)");
        }
    }

    fn layer_started(&self, digest: &Digest, size: u64) {
        if let Ok(mut s) = self.started.lock() {
            s.insert(digest.clone(), (Instant::now(), size));
        }
        if let Some(b) = &self.bars {
            b.total.inc_length(size);
            let bar = b.multi.insert_before(&b.total, ProgressBar::new(size));
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(short(digest).to_string());
            if let Ok(mut l) = b.layers.lock() {
                l.insert(digest.clone(), bar);
            }
        }
    }

    fn layer_bytes(&self, digest: &Digest, n: u64) {
        if let Some(b) = &self.bars {
            b.total.inc(n);
            if let Ok(l) = b.layers.lock()
                && let Some(bar) = l.get(digest)
            {
                bar.inc(n);
            }
        }
    }

    fn layer_done(&self, digest: &Digest, already_present: bool) {
        if self.quiet {
            return;
        }
        if let Some(b) = &self.bars {
            if let Ok(l) = b.layers.lock()
                && let Some(bar) = l.get(digest)
            {
                bar.finish_with_message("done");
            }
            return;
        }
        if already_present {
            eprintln!("layer {}: already present", short(digest));
        } else if let Some((t, size)) = self
            .started
            .lock()
            .ok()
            .and_then(|s| s.get(digest).copied())
        {
            eprintln!(
                "layer {}: {} in {:.2}s",
                short(digest),
                crate::util::human_bytes(size),
                t.elapsed().as_secs_f64()
            );
        }
    }

    fn layer_retry(&self, digest: &Digest, error: &str) {
        if !self.quiet {
            eprintln!("layer {}: retrying after: {error}", short(digest));
        }
    }
}
