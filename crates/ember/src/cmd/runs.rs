//! `ember runs`: runs and their start-time breakdown.

use crate::cmd::cluster::ControlArgs;
use crate::util::{quantile, span};
use ember_control::model::Run;
use std::process::ExitCode;

/// List runs, newest first, or start-latency percentiles with --stats.
#[derive(clap::Args, Debug)]
#[command(after_help = "--stats phases: queue (submit → picked up by the \
scheduler), placement (→ assigned to a node; 0 for a warm hand-off), image (→ image \
on the node), runner (→ runner ready), process (→ process started), total (submit → \
process started).")]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print JSON (the runs with their start-time breakdown).
    #[arg(long)]
    pub json: bool,
    /// Print start-latency percentiles per phase.
    #[arg(long)]
    pub stats: bool,
}

/// One phase of the start: its name and how to get its duration.
type Phase = (&'static str, fn(&Run) -> Option<u64>);

/// The phases `--stats` reports, in order.
const PHASES: [Phase; 6] = [
    // Runs stored before `claimed` existed count placement in the queue.
    ("queue", |r| {
        span(r.times.queued, r.times.claimed.or(r.times.scheduled))
    }),
    ("placement", |r| span(r.times.claimed, r.times.scheduled)),
    ("image", |r| span(r.times.scheduled, r.times.image_ready)),
    ("runner", |r| {
        span(r.times.image_ready, r.times.runner_ready)
    }),
    ("process", |r| {
        span(r.times.runner_ready, r.times.process_started)
    }),
    ("total", |r| span(r.times.queued, r.times.process_started)),
];

/// Runs `ember runs`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let runs = args.control.client()?.runs().await?;
    if args.stats {
        let started: Vec<&Run> = runs
            .iter()
            .filter(|r| r.times.process_started.is_some())
            .collect();
        let mut out = serde_json::Map::new();
        if !args.json {
            println!("{} runs started (of {})", started.len(), runs.len());
            println!(
                "{:<10} {:>8} {:>8} {:>8} {:>8}",
                "PHASE", "P50 ms", "P90 ms", "P99 ms", "MAX ms"
            );
        }
        for (name, f) in PHASES {
            let mut v: Vec<u64> = started.iter().filter_map(|r| f(r)).collect();
            v.sort_unstable();
            let (p50, p90, p99, max) = (
                quantile(&v, 0.5),
                quantile(&v, 0.9),
                quantile(&v, 0.99),
                v.last().copied().unwrap_or(0),
            );
            if args.json {
                out.insert(
                    name.to_owned(),
                    serde_json::json!({"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max, "n": v.len()}),
                );
            } else {
                println!("{name:<10} {p50:>8} {p90:>8} {p99:>8} {max:>8}");
            }
        }
        if args.json {
            println!("{}", serde_json::Value::Object(out));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<10} {:<12} {:>4} {:>9}  WHAT",
        "RUN", "STATE", "NODE", "EXIT", "START ms"
    );
    for r in &runs {
        let what = r
            .deployment
            .clone()
            .unwrap_or_else(|| r.image.reference.clone());
        println!(
            "{:<10} {:<10} {:<12} {:>4} {:>9}  {what}",
            r.id.to_string(),
            r.state.as_str(),
            r.node.as_deref().unwrap_or("-"),
            r.exit_code.map_or("-".into(), |c| c.to_string()),
            span(r.times.queued, r.times.process_started).map_or("-".into(), |t| t.to_string()),
        );
    }
    Ok(ExitCode::SUCCESS)
}
