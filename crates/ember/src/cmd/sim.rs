//! `ember sim gen|run`: the pre-pull simulator (crate `ember-sim`).

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use ember_sim::generate::{GenConfig, generate};
use ember_sim::replay::{Policy, SimConfig, catalogue_bytes, replay};

use crate::util::parse_size;

/// Simulator subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Write a synthetic launch trace (JSON lines, docs/sim.md) with the
    /// published skew (top 20 images = 80 % of launches), daily rebuilds,
    /// new images every day and shared base layers.
    Gen {
        /// Days of launches.
        #[arg(long, default_value_t = 10.0)]
        days: f64,
        /// Launches per day (the published service: 130,866 in ten days).
        #[arg(long, default_value_t = 13_087.0)]
        launches_per_day: f64,
        /// Images at the start.
        #[arg(long, default_value_t = 400)]
        images: usize,
        /// Seed: the same seed writes the same trace.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file (default: stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Replay a trace through Ember's planner, scheduler and GC, and
    /// through two baselines (no pre-pull with kubelet LRU GC and
    /// Kubernetes image locality; a fixed top-K list on every node), on
    /// the same modelled nodes and disks, and print them side by side.
    Run {
        /// The trace (JSON lines).
        trace: PathBuf,
        /// Nodes.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// Run slots per node.
        #[arg(long, default_value_t = 8)]
        slots: u32,
        /// Each node's disk as a fraction of the trace's catalogue (all
        /// distinct layer bytes); ignored when --disk is given.
        #[arg(long, default_value_t = 0.3)]
        disk_fraction: f64,
        /// Each node's disk for images, e.g. 200G.
        #[arg(long)]
        disk: Option<String>,
        /// Node ← cache bandwidth per second, e.g. 125M (1 Gbit/s).
        #[arg(long, default_value = "125M")]
        bandwidth: String,
        /// Cache ← upstream bandwidth per second.
        #[arg(long, default_value = "50M")]
        upstream_bandwidth: String,
        /// Seconds from image-ready to process start.
        #[arg(long, default_value_t = 0.3)]
        runner_start: f64,
        /// Seconds between Ember's pull plans.
        #[arg(long, default_value_t = 300.0)]
        plan_interval: f64,
        /// Share of a node's link pre-pulls may use.
        #[arg(long, default_value_t = 0.5)]
        prepull_share: f64,
        /// Half-life of launch counts, hours.
        #[arg(long, default_value_t = 6.0)]
        half_life_hours: f64,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `ember sim ...`.
pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Gen {
            days,
            launches_per_day,
            images,
            seed,
            output,
        } => {
            anyhow::ensure!(
                days > 0.0 && launches_per_day > 0.0,
                "--days and --launches-per-day must be positive"
            );
            anyhow::ensure!(images > 20, "--images must be more than the 20 of the head");
            let trace = generate(&GenConfig {
                days,
                launches_per_day,
                images,
                seed,
                ..GenConfig::default()
            });
            match output {
                Some(p) => {
                    let f =
                        File::create(&p).with_context(|| format!("creating {}", p.display()))?;
                    ember_sim::trace::write(BufWriter::new(f), &trace)
                        .with_context(|| format!("writing {}", p.display()))?;
                    eprintln!("{} launches written to {}", trace.len(), p.display());
                }
                None => ember_sim::trace::write(BufWriter::new(std::io::stdout().lock()), &trace)
                    .context("writing the trace")?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            trace,
            nodes,
            slots,
            disk_fraction,
            disk,
            bandwidth,
            upstream_bandwidth,
            runner_start,
            plan_interval,
            prepull_share,
            half_life_hours,
            json,
        } => {
            anyhow::ensure!(
                nodes > 0 && slots > 0,
                "--nodes and --slots must be positive"
            );
            anyhow::ensure!(
                (0.0..=1.0).contains(&prepull_share) && prepull_share > 0.0,
                "--prepull-share must be in (0, 1]"
            );
            let f = File::open(&trace).with_context(|| format!("opening {}", trace.display()))?;
            let launches = ember_sim::trace::read(BufReader::new(f))
                .with_context(|| format!("reading {}", trace.display()))?;
            let catalogue = catalogue_bytes(&launches);
            let disk_bytes = match disk {
                Some(d) => parse_size(&d)?,
                None => (catalogue as f64 * disk_fraction) as u64,
            };
            let cfg = SimConfig {
                nodes,
                slots,
                disk_bytes,
                node_bps: parse_size(&bandwidth)? as f64,
                upstream_bps: parse_size(&upstream_bandwidth)? as f64,
                runner_start_s: runner_start,
                plan_interval_s: plan_interval,
                prepull_share,
                half_life_s: half_life_hours * 3600.0,
            };
            let reports: Vec<_> = [Policy::Ember, Policy::Kubelet, Policy::FixedList]
                .into_iter()
                .map(|p| replay(&launches, &cfg, p))
                .collect();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "config": cfg, "catalogue_bytes": catalogue, "reports": reports
                    }))?
                );
                return Ok(ExitCode::SUCCESS);
            }
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            println!(
                "{} launches, {} nodes × {} slots, disk {:.1} GiB per node ({:.0} % of a {:.1} GiB catalogue)",
                launches.len(),
                nodes,
                slots,
                gib(disk_bytes),
                100.0 * disk_bytes as f64 / catalogue.max(1) as f64,
                gib(catalogue)
            );
            println!(
                "{:<12} {:>9} {:>9} {:>12} {:>12} {:>9} {:>9} {:>9}",
                "policy",
                "on node",
                "cache hit",
                "upstream GiB",
                "prepull GiB",
                "unused",
                "p50 s",
                "p99 s"
            );
            for r in &reports {
                println!(
                    "{:<12} {:>8.1}% {:>8.1}% {:>12.1} {:>12.1} {:>8.1}% {:>9.2} {:>9.2}",
                    r.policy,
                    100.0 * r.found_ratio(),
                    100.0 * r.cache_hit_ratio(),
                    gib(r.upstream_bytes),
                    gib(r.prepulled_bytes),
                    100.0 * r.unused_ratio(),
                    r.start_p50_s,
                    r.start_p99_s
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
