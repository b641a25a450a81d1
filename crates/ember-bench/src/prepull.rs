//! `ember bench prepull`: what pre-pulls in flight cost a run's pull.
//!
//! The target is that a pre-pull never delays a run's own pull by more
//! than 10 %. Each repetition pulls image X into a fresh store, in turn:
//!
//! * **alone**: nothing else going on;
//! * **with pre-pulls**: the node's own pre-pull code
//!   ([`ember_node::Prepuller`], at the configured cap) is pre-pulling the
//!   other images one after another, already streaming when X's pull
//!   starts; X's pull is marked as a run's pull, as the node marks it, so
//!   the pre-pulls hold still until it ends;
//! * **unyielding** (optional): the other images pulled at the same time
//!   with no gate at all, which is what the yield saves.
//!
//! The order of the arms rotates from one repetition to the next, so a
//! drift of the machine's load does not favour one. The pre-pulls go into
//! a store of their own, so X never finds a layer a pre-pull brought (the
//! images may share a base). Reported: every time, the medians, the ratio
//! of medians, and the bytes the pre-pulls received while X was pulling.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ember_oci::{Digest, Reference};
use ember_registry::RegistryClient;
use ember_store::{PullOptions, PullProgress, SilentProgress, Store};

use crate::Say;
use crate::stats::{ms, quantile};

/// What to measure.
#[derive(Debug, Clone)]
pub struct PrepullConfig {
    /// The run's image.
    pub image: Reference,
    /// The images being pre-pulled meanwhile.
    pub others: Vec<Reference>,
    /// Repetitions of each arm.
    pub reps: usize,
    /// The pre-pulls' cap in bytes per second (`None`: uncapped, the
    /// hardest case for the yield).
    pub bandwidth: Option<u64>,
    /// Also measure the unyielding arm.
    pub unyielding: bool,
    /// Scratch directory for the stores (emptied as it goes).
    pub dir: PathBuf,
}

/// Why the benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum PrepullBenchError {
    /// A store could not be opened or a pull failed.
    #[error("{what}")]
    Store {
        /// What was being done.
        what: String,
        /// Why it failed (boxed: a store error is large).
        #[source]
        source: Box<ember_store::StoreError>,
    },
    /// The pre-pulls never started streaming.
    #[error("the pre-pulls of {0} received nothing within 60 s")]
    NoPrepull(String),
    /// Nothing to pre-pull, or no repetition.
    #[error("{0}")]
    Config(String),
}

/// What was measured; times in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrepullReport {
    /// The run's image.
    pub image: String,
    /// The images pre-pulled meanwhile.
    pub others: Vec<String>,
    /// Repetitions.
    pub reps: usize,
    /// The pre-pulls' cap, bytes per second (`None`: uncapped).
    pub bandwidth: Option<u64>,
    /// Compressed bytes of X's pull.
    pub image_bytes: u64,
    /// X's pull alone, each repetition.
    pub alone_ms: Vec<f64>,
    /// X's pull with the pre-pulls in flight, each repetition.
    pub with_prepull_ms: Vec<f64>,
    /// Bytes the pre-pulls received while X pulled, each repetition.
    pub prepull_bytes_during: Vec<u64>,
    /// X's pull next to ungated pulls of the others, each repetition.
    pub unyielding_ms: Vec<f64>,
    /// Median alone.
    pub median_alone_ms: f64,
    /// Median with the pre-pulls.
    pub median_with_prepull_ms: f64,
    /// `median_with_prepull_ms / median_alone_ms`; the target is ≤ 1.10.
    pub ratio: f64,
    /// Median next to ungated pulls, if measured.
    pub median_unyielding_ms: Option<f64>,
    /// `median_unyielding_ms / median_alone_ms`, if measured.
    pub unyielding_ratio: Option<f64>,
}

impl std::fmt::Display for PrepullReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cap = match self.bandwidth {
            Some(b) => format!("{b} B/s"),
            None => "uncapped".into(),
        };
        writeln!(
            f,
            "pull of {} ({} bytes), {} repetitions; pre-pulls of {} ({cap})",
            self.image,
            self.image_bytes,
            self.reps,
            self.others.join(", ")
        )?;
        writeln!(
            f,
            "  alone:            median {:.0} ms",
            self.median_alone_ms
        )?;
        writeln!(
            f,
            "  with pre-pulls:   median {:.0} ms  ratio {:.3}  (pre-pull bytes during the pull, max {})",
            self.median_with_prepull_ms,
            self.ratio,
            self.prepull_bytes_during.iter().max().unwrap_or(&0)
        )?;
        if let (Some(m), Some(r)) = (self.median_unyielding_ms, self.unyielding_ratio) {
            writeln!(f, "  ungated pulls:    median {m:.0} ms  ratio {r:.3}")?;
        }
        Ok(())
    }
}

/// Counts the bytes a pull receives.
#[derive(Default)]
struct Counted(AtomicU64);

impl PullProgress for Counted {
    fn layer_bytes(&self, _digest: &Digest, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// A fresh store under `dir`.
fn fresh(dir: &std::path::Path, name: &str) -> Result<Store, PrepullBenchError> {
    let p = dir.join(name);
    let _ = std::fs::remove_dir_all(&p);
    Store::open(&p).map_err(|source| PrepullBenchError::Store {
        what: format!("opening a store in {}", p.display()),
        source: Box::new(source),
    })
}

/// Runs the benchmark.
pub async fn run(
    cfg: &PrepullConfig,
    registry: &Arc<RegistryClient>,
    say: &Say,
) -> Result<PrepullReport, PrepullBenchError> {
    if cfg.others.is_empty() || cfg.reps == 0 {
        return Err(PrepullBenchError::Config(
            "give at least one image to pre-pull and one repetition".into(),
        ));
    }
    let mut alone = Vec::new();
    let mut with = Vec::new();
    let mut during = Vec::new();
    let mut unyielding = Vec::new();
    let mut image_bytes = 0;
    let arms = if cfg.unyielding { 3 } else { 2 };
    // The pre-pull store of the arm before, removed one arm later (by then
    // its aborted extraction has surely stopped writing).
    let mut last_pre: Option<PathBuf> = None;
    for rep in 0..cfg.reps {
        for k in 0..arms {
            let arm = (rep + k) % arms;
            // New directories every time: an aborted pre-pull's extraction
            // may still be finishing in the last ones.
            if let Some(p) = last_pre.take() {
                let _ = std::fs::remove_dir_all(p);
            }
            let run_store = fresh(&cfg.dir, &format!("run-{rep}-{arm}"))?;
            let pre_name = format!("prepull-{rep}-{arm}");
            let pre_store = fresh(&cfg.dir, &pre_name)?;
            last_pre = Some(cfg.dir.join(pre_name));
            let prepuller = Arc::new(ember_node::Prepuller::new(&cfg.dir, cfg.bandwidth));
            let counted = Arc::new(Counted::default());
            // The other images, one after another, as a node pre-pulls.
            let background = match arm {
                0 => None,
                _ => {
                    let (p, s, r, c, others) = (
                        prepuller.clone(),
                        pre_store.clone(),
                        registry.clone(),
                        counted.clone(),
                        cfg.others.clone(),
                    );
                    let gated = arm == 1;
                    Some(tokio::spawn(async move {
                        for o in &others {
                            let progress: Arc<dyn PullProgress> = c.clone();
                            let _ = if gated {
                                p.prepull(&s, &r, o, progress).await
                            } else {
                                ember_store::pull(&s, &r, o, &PullOptions::default(), progress)
                                    .await
                            };
                        }
                    }))
                }
            };
            if background.is_some() {
                let deadline = Instant::now() + Duration::from_secs(60);
                while counted.0.load(Ordering::Relaxed) == 0 {
                    if Instant::now() > deadline {
                        return Err(PrepullBenchError::NoPrepull(cfg.others[0].to_string()));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let before = counted.0.load(Ordering::Relaxed);
            let t0 = Instant::now();
            let (report, took, got) = {
                let _run = (arm == 1).then(|| prepuller.run_pull(&cfg.image.to_string()));
                let r = ember_store::pull(
                    &run_store,
                    registry,
                    &cfg.image,
                    &PullOptions::default(),
                    Arc::new(SilentProgress),
                )
                .await;
                // Read before the guard drops and the pre-pulls read on.
                let got = counted.0.load(Ordering::Relaxed) - before;
                (r, ms(t0.elapsed()), got)
            };
            let report = report.map_err(|source| PrepullBenchError::Store {
                what: format!("pulling {}", cfg.image),
                source: Box::new(source),
            })?;
            image_bytes = report.bytes_downloaded;
            if let Some(b) = background {
                b.abort();
                let _ = b.await;
            }
            drop(run_store);
            let _ = std::fs::remove_dir_all(cfg.dir.join(format!("run-{rep}-{arm}")));
            let name = ["alone", "with pre-pulls", "ungated pulls"][arm];
            say(&format!("rep {}: {name}: {took:.0} ms", rep + 1));
            match arm {
                0 => alone.push(took),
                1 => {
                    with.push(took);
                    during.push(got);
                }
                _ => unyielding.push(took),
            }
        }
    }
    if let Some(p) = last_pre {
        let _ = std::fs::remove_dir_all(p);
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        quantile(&s, 0.5)
    };
    let (ma, mw) = (median(&alone), median(&with));
    let mu = cfg.unyielding.then(|| median(&unyielding));
    Ok(PrepullReport {
        image: cfg.image.to_string(),
        others: cfg.others.iter().map(|o| o.to_string()).collect(),
        reps: cfg.reps,
        bandwidth: cfg.bandwidth,
        image_bytes,
        median_alone_ms: ma,
        median_with_prepull_ms: mw,
        ratio: mw / ma,
        median_unyielding_ms: mu,
        unyielding_ratio: mu.map(|m| m / ma),
        alone_ms: alone,
        with_prepull_ms: with,
        prepull_bytes_during: during,
        unyielding_ms: unyielding,
    })
}
